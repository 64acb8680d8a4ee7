"""The docs site as a reader sees it: the built HTML, checked page by page.

The site is the one ``mkdocs build --strict`` wrote: ``$PYRO_VAE_SITE_DIR`` when set
(``.ci/run`` builds it once, after executing the notebooks, and runs this file on it),
else a build of the repository into a temporary folder. Checked: every equation is
MathML (no TeX delimiter left for a script to find), no Sphinx role or ``Example::`` is
printed as text, each role of a shown docstring is a link on the page that shows it,
every notebook is a page with its figures, no internal link or anchor is broken, nothing
is loaded from the internet, the API pages show public names only and the modules of the
exported names first, the configuration tables read cleanly; and three pages are
screenshot by headless Chromium, the pictures not blank (kept in
``$PYRO_VAE_SCREENSHOTS`` for a person to look at).
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
PACKAGE_PAGES = ("models", "objectives", "analysis", "training", "app")
# file name -> (page, window height): the equations, a notebook down to its first two
# figures, an API page with its cross-reference links
SCREENSHOTS = {
    "conventions.png": ("conventions/index.html", 2400),
    "tutorial-02.png": ("tutorials/02_monte_carlo_vs_closed_form_kl/index.html", 3600),
    "api-objectives.png": ("api/objectives/index.html", 2400),
}
WIDTH = 1280
MATPLOTLIB_BLUE = (31, 119, 180)  # the colour of a figure's first bars and lines

sys.path.insert(0, str(REPO / "docs"))
import sphinx_markup  # noqa: E402 (docs/ on the path first)


class _Page(html.parser.HTMLParser):
    """A page's ids, its links and loads (tag, attribute, URL), and its text outside
    ``code``, ``pre``, ``script``, ``style`` and ``math``."""

    SKIP = {"code", "pre", "script", "style", "math", "textarea"}

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.urls: list[tuple[str, str, str]] = []
        self.prose: list[str] = []
        self._skipping: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        for key in ("id", "name"):
            if attributes.get(key):
                self.ids.add(attributes[key])
        for key in ("href", "src"):
            if attributes.get(key) is not None:
                self.urls.append((tag, attributes.get("rel") or "", attributes[key]))
        if tag in self.SKIP:
            self._skipping.append(tag)

    def handle_endtag(self, tag):
        if self._skipping and self._skipping[-1] == tag:
            self._skipping.pop()

    def handle_data(self, data):
        if not self._skipping:
            self.prose.append(data)

    @property
    def text(self) -> str:
        return "".join(self.prose)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    given = os.environ.get("PYRO_VAE_SITE_DIR")
    if given:
        path = Path(given).resolve()
        assert (path / "index.html").is_file(), f"no built site in {path}"
        return path
    path = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    return path


@pytest.fixture(scope="module")
def pages(site) -> dict[str, _Page]:
    """Every HTML page of the site but the 404 page (whose links are absolute)."""
    found = {
        str(path.relative_to(site)): _Page(path.read_text(encoding="utf-8"))
        for path in sorted(site.rglob("*.html"))
    }
    found.pop("404.html", None)
    # a page per Markdown file of docs/ and per notebook
    assert len(found) == len(list((REPO / "docs").rglob("*.md"))) + len(NOTEBOOKS), sorted(found)
    return found


@pytest.fixture(scope="module")
def markup() -> sphinx_markup.SphinxMarkup:
    """The docstring rewrite the build made, with what it linked and what it did not."""
    extension = sphinx_markup.SphinxMarkup()
    sphinx_markup.load_package(str(REPO), extension)
    return extension


# ---------------------------------------------------------------------- the converters


def test_literal_blocks_and_math_directives_become_markdown():
    text = (
        "Example::\n\n    config = f(1)\n\nModel (sites)::\n\n    z ~ N(0, 1)\n\n"
        "Plain ::\n\n    x = 1\n\n.. math::\n    a = \\frac{1}{2}\n\nafter"
    )
    assert sphinx_markup.convert_blocks(text).split("\n") == [
        "Example:",
        "",
        "```python",
        "config = f(1)",
        "```",
        "",
        "Model (sites):",
        "",
        "```text",
        "z ~ N(0, 1)",
        "```",
        "",
        "Plain",
        "",
        "```python",
        "x = 1",
        "```",
        "",
        "$$",
        "a = \\frac{1}{2}",
        "$$",
        "",
        "after",
    ]


def test_roles_become_links_to_the_object_they_resolve_to(markup):
    package = sphinx_markup.load_package(str(REPO))
    model_config = package["config.ModelConfig"].docstring.value
    assert "[`UserInputError`][pyro_vae.errors.UserInputError]" in model_config
    assert "[`build_vae`][pyro_vae.models.build.build_vae]" in model_config
    assert ":class:" not in model_config and "```python" in model_config
    # a relative name, in the scope of the documented object
    registry = package["objectives.registry"].docstring.value
    assert ":func:" not in registry and ":class:" not in registry
    assert ("pyro_vae.objectives.capture.capture_pays", "`CAPTURE_SECONDS`") not in markup.links
    # outside the package: code, not a link
    assert ("pyro_vae.objectives.registry.make_elbo", ":class:`pyro.infer.Trace_ELBO`") in (
        markup.as_code
    )


def test_a_role_naming_nothing_in_the_package_is_a_build_warning(caplog):
    markup = sphinx_markup.SphinxMarkup()  # not the shared one: this adds to its records
    sphinx_markup.load_package(str(REPO), markup)
    scope = markup.package["config.ModelConfig"]
    match = sphinx_markup.ROLE.search(":func:`pyro_vae.config.no_such_function`")
    with caplog.at_level("WARNING", logger=sphinx_markup.logger.name):
        assert markup._role(match, scope) == "`pyro_vae.config.no_such_function`"
    assert "does not exist" in caplog.text
    # the two known slips of the docstrings link to what they meant
    corrected = sphinx_markup.ROLE.search(":mod:`pyro_vae.executors`")
    assert markup._role(corrected, scope) == "[`pyro_vae.app.executors`][pyro_vae.app.executors]"


def test_tex_becomes_mathml_that_chromium_draws():
    import tex_mathml

    page, count = tex_mathml.render(
        '<p><span class="arithmatex">\\(\\mathbb E_q \\log p &lt; 0\\)</span></p>'
        '<div class="arithmatex">\\[\\mathcal N \\quad \\texttt{a\\_b}\\]</div>'
    )
    assert count == 2
    assert "\\" not in page and "<math " in page and 'display="block"' in page
    assert "\U0001d53c" in page and "\U0001d4a9" in page  # double-struck E, script N
    assert "a_b" in page and "<mo>&#x0003C;</mo>" in page
    assert '<mspace width="0.1667em">' in page  # \log p: a thin space
    assert tex_mathml.styled_letter("R", "double-struck") == "\u211d"  # from Letterlike


# ---------------------------------------------------------------------- equations


def test_no_page_keeps_a_tex_delimiter_and_the_equations_are_mathml(site, pages):
    raw = {
        name: sorted({d for d in ("\\(", "\\)", "\\[", "\\]", "$$") if d in page.text})
        for name, page in pages.items()
    }
    assert not {name: found for name, found in raw.items() if found}
    conventions = (site / "conventions/index.html").read_text(encoding="utf-8")
    assert conventions.count("<math ") >= 15
    assert (
        conventions.count('<math xmlns="http://www.w3.org/1998/Math/MathML" display="block"') >= 3
    )
    # the docstrings' ``.. math::`` blocks too
    for page in ("objectives", "models", "analysis"):
        text = (site / f"api/{page}/index.html").read_text(encoding="utf-8")
        assert 'display="block"' in text, page
    # \mathbb E as the letter MathML Core draws double-struck
    assert "\U0001d53c" in conventions


def test_nothing_is_loaded_from_the_internet(pages):
    loads = {
        (name, url)
        for name, page in pages.items()
        for tag, rel, url in page.urls
        if (tag in ("script", "img", "iframe") or (tag == "link" and "stylesheet" in rel))
        and urlsplit(url).scheme in ("http", "https")
    }
    assert not loads


# ---------------------------------------------------------------------- API pages


def test_no_sphinx_role_or_literal_block_marker_is_printed(pages):
    role = re.compile(r":(?:py:)?(?:mod|class|func|meth|attr|data|exc|obj|const):")
    printed = {
        name: role.findall(page.text) + re.findall(r"\w::(?:\s|$)", page.text)
        for name, page in pages.items()
    }
    assert not {name: found for name, found in printed.items() if found}


def test_every_role_of_a_shown_docstring_is_a_link_on_its_page(pages, markup):
    assert len(markup.links) > 150
    page_of: dict[str, list[str]] = {}
    for name, page in pages.items():
        for anchor in page.ids:
            page_of.setdefault(anchor, []).append(name)
    hrefs = {name: {url for tag, _, url in page.urls if tag == "a"} for name, page in pages.items()}
    missing, shown = [], 0
    for scope, target in markup.links:
        for name in page_of.get(scope, []):
            shown += 1
            if not any(url.endswith("#" + target) for url in hrefs[name]):
                missing.append(f"{name}: {scope} -> {target}")
    assert shown > 150
    assert not missing


def test_a_role_printed_as_code_names_something_the_pages_do_not_show(pages, markup):
    ids = set().union(*(page.ids for page in pages.values()))
    for _, role in markup.as_code:
        target = role.split("`")[1].lstrip("~")
        assert target not in ids and not any(i.endswith("." + target) for i in ids), role


def test_literal_blocks_render_as_code(site):
    text = (site / "api/data-config/index.html").read_text(encoding="utf-8")
    assert "Example::" not in text
    # ModelConfig's "Example::" block, highlighted as Python
    example = (
        '<span class="n">config</span> <span class="o">=</span> <span class="n">ModelConfig</span>'
    )
    assert example in text


def test_private_names_are_not_listed(pages):
    package = sphinx_markup.load_package(str(REPO))
    ids = set().union(*(page.ids for page in pages.values()))
    listed = []
    for module in _modules(package):
        if module.exports:
            for name, member in module.members.items():
                if name not in module.exports and (member.is_alias or not member.is_module):
                    if f"{module.path}.{name}" in ids:
                        listed.append(f"{module.path}.{name}")
    assert not listed
    assert "pyro_vae.objectives.capture.TOLERANCE" not in ids
    assert "pyro_vae.objectives.capture.capture_pays" in ids


def test_every_public_module_is_documented(pages):
    ids = set().union(*(page.ids for page in pages.values()))
    package = sphinx_markup.load_package(str(REPO))
    modules = [m.path for m in _modules(package) if not m.name.startswith("_")]
    assert len(modules) > 40
    assert not [path for path in modules if path not in ids]


@pytest.mark.parametrize("page", PACKAGE_PAGES)
def test_the_modules_of_the_exported_names_come_first(site, page):
    import pyro_vae

    exporting = {module for module in pyro_vae._EXPORTS.values()}
    text = (site / f"api/{page}/index.html").read_text(encoding="utf-8")
    order = list(
        dict.fromkeys(re.findall(rf'id="(pyro_vae\.{page}\.[a-z_]+)"', text))
    )  # the modules, in the order the page shows them
    assert order, page
    flags = [module in exporting for module in order]
    assert any(flags), order
    assert flags == sorted(flags, reverse=True), order


def test_the_configuration_tables_read_cleanly(site):
    text = (site / "guide/configuration/index.html").read_text(encoding="utf-8")
    assert "\\|" not in text
    assert "<td><code>float | None</code></td>" in text
    assert "<td><code>latent_dims</code></td>" in text
    guide = re.search(r"<td><code>guide</code></td>(.*?)</tr>", text, re.S)
    assert guide is not None
    assert "bottom-up" in guide[1] and "widths of each MLP" not in guide[1]
    assert "#pyro_vae.errors.UserInputError" in text


# ---------------------------------------------------------------------- notebooks


def _images_in(notebook: Path) -> int:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return sum(
        "image/png" in output.get("data", {})
        for cell in cells
        for output in cell.get("outputs", [])
    )


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_is_a_page_with_its_figures(site, pages, notebook):
    page = site / "tutorials" / notebook.stem / "index.html"
    assert page.is_file()
    text = page.read_text(encoding="utf-8")
    images = text.count('src="data:image/png;base64,')
    assert images >= 1
    assert images == _images_in(REPO / "docs" / "tutorials" / notebook.name)
    assert (site / "tutorials" / notebook.stem / notebook.name).is_file()  # the download
    for linking in ("tutorials/index.html",):
        hrefs = {url for tag, _, url in pages[linking].urls if tag == "a"}
        assert f"{notebook.stem}/" in hrefs, linking


def test_the_docs_tutorials_are_the_repository_notebooks():
    linked = sorted((REPO / "docs" / "tutorials").glob("*.ipynb"))
    assert [p.name for p in linked] == [p.name for p in NOTEBOOKS]
    assert all(p.resolve() == REPO / "notebooks" / p.name for p in linked)


def test_the_guide_pages_link_the_notebooks_they_illustrate(pages):
    wanted = {
        "guide/training/index.html": "01_vae_as_a_pyro_program",
        "guide/estimators/index.html": "03_comparing_estimators",
        "guide/hierarchical/index.html": "04_hierarchical_latents",
        "guide/own-model/index.html": "05_bring_your_own_model",
    }
    for name, stem in wanted.items():
        hrefs = {url for tag, _, url in pages[name].urls if tag == "a"}
        assert f"../../tutorials/{stem}/" in hrefs, name


# ---------------------------------------------------------------------- links


def test_no_internal_link_or_anchor_is_broken(site, pages):
    broken = []
    for name, page in pages.items():
        base = (site / name).parent
        for _, _, url in page.urls:
            parts = urlsplit(url)
            if parts.scheme or url.startswith("//") or not (parts.path or parts.fragment):
                continue
            target = (base / unquote(parts.path)).resolve() if parts.path else site / name
            if target.is_dir():
                target = target / "index.html"
            if not target.exists() or site.resolve() not in target.resolve().parents:
                broken.append(f"{name}: {url}")
                continue
            if parts.fragment and target.suffix == ".html":
                key = str(target.resolve().relative_to(site.resolve()))
                anchors = pages[key].ids if key in pages else set()
                if unquote(parts.fragment) not in anchors:
                    broken.append(f"{name}: {url} (no such anchor)")
    assert not broken


# ---------------------------------------------------------------------- screenshots


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def screenshots(site, tmp_path_factory) -> dict[str, Path]:
    browser = _browser()
    if browser is None:
        if os.environ.get("CI") == "true":
            pytest.fail("headless Chromium is needed in CI (.ci/run installs Debian's)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    folder = Path(os.environ.get("PYRO_VAE_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    profile = tmp_path_factory.mktemp("chromium-profile")
    taken = {}
    for file_name, (page, height) in SCREENSHOTS.items():
        out = folder.resolve() / file_name
        out.unlink(missing_ok=True)
        run = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={WIDTH},{height}",
                "--virtual-time-budget=3000",
                f"--screenshot={out}",
                (site / page).resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert out.is_file(), run.stderr[-2000:]
        taken[file_name] = out
        print(f"screenshot of {page}: {out}")
    return taken


@pytest.mark.parametrize("name", sorted(SCREENSHOTS))
def test_a_screenshot_of_the_page_is_not_blank(screenshots, name):
    from PIL import Image

    with Image.open(screenshots[name]) as image:
        assert image.size == (WIDTH, SCREENSHOTS[name][1])
        pixels = image.convert("RGB")
    small = pixels.resize((WIDTH // 4, pixels.size[1] // 4))
    colours = small.getcolors(maxcolors=small.size[0] * small.size[1])
    assert colours is not None and len(colours) > 50  # text, code, figures: many shades
    width, height = pixels.size
    content = pixels.crop((260, 200, width - 260, height))  # the page's body column
    dark = sum(1 for r, g, b in content.getdata() if r + g + b < 450)
    assert dark > 0.01 * content.size[0] * content.size[1]  # text drawn, not a white page
    header = pixels.getpixel((width // 2, 10))
    assert header != (255, 255, 255)  # the theme's header bar is drawn
    if name.startswith("tutorial"):  # the notebook's figures are drawn, not broken images
        blue = sum(
            1
            for pixel in content.getdata()
            if sum(abs(a - b) for a, b in zip(pixel, MATPLOTLIB_BLUE)) < 30
        )
        assert blue > 2000


def _modules(module):
    yield module
    for member in module.members.values():
        if not member.is_alias and member.is_module:
            yield from _modules(member)
