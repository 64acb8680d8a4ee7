"""The site's equations, rendered at build time: TeX to MathML, no script at read time.

``pymdownx.arithmatex`` (``generic: true``) leaves each formula of a page (``$...$``,
``$$...$$``, and the ``.. math::`` blocks of the docstrings, see ``sphinx_markup.py``) as
``<span class="arithmatex">\\(...\\)</span>`` or ``<div class="arithmatex">\\[...\\]</div>``.
:func:`render` replaces each with the MathML that ``latex2mathml`` writes for it, which
browsers typeset natively (Chromium since 109, Firefox, Safari): the equations read the
same offline as online, and the HTML keeps no TeX delimiters.

Three things MathML Core (what Chromium implements) leaves out are done here: the thin
space after ``\\log`` and the like; ``mathvariant`` on ``<mi>`` other than ``normal``
(``\\mathbb E``, ``\\mathcal N``) becomes the styled Unicode letters (``𝔼``, ``𝒩``) that
MathML Core expects; and monospace text (``\\texttt``) is styled by
``docs/stylesheets/extra.css``, which also names a font with a MATH table.
"""

from __future__ import annotations

import html
import re
import unicodedata

import latex2mathml.converter

FORMULA = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?P<open>\\\(|\\\[)'
    r"(?P<tex>.*?)(?:\\\)|\\\])\s*</(?P=tag)>",
    re.S,
)
TEXT_COMMAND = re.compile(r"\\(text|texttt|textrm|textit|textbf|mathrm|operatorname)\{([^{}]*)\}")
STYLED_MI = re.compile(r'<mi mathvariant="(?P<variant>[a-z-]+)">(?P<text>[^<]*)</mi>')
STYLES = {
    "bold": "BOLD",
    "italic": "ITALIC",
    "bold-italic": "BOLD ITALIC",
    "double-struck": "DOUBLE-STRUCK",
    "script": "SCRIPT",
    "fraktur": "FRAKTUR",
    "sans-serif": "SANS-SERIF",
    "monospace": "MONOSPACE",
}
# \log p: TeX sets a thin space after an operator name unless a bracket follows
OPERATOR_NAME = re.compile(
    r"(<mi>(?:log|ln|exp|lim|max|min|sup|inf|arg|det|sin|cos|tan)</mi>)(?!<mo[^>]*>[(\[|])"
)
THIN_SPACE = '<mspace width="0.1667em"></mspace>'
# the letters Unicode encoded before the Mathematical Alphanumeric Symbols block
OLDER = {"FRAKTUR": "BLACK-LETTER"}


def styled_letter(char: str, variant: str) -> str:
    """``char`` in ``variant`` (``"double-struck"``: ``E`` -> ``𝔼``); unchanged where
    Unicode has no such letter."""
    style = STYLES.get(variant)
    if style is None or not ("A" <= char <= "Z" or "a" <= char <= "z"):
        return char
    case = "CAPITAL" if char.isupper() else "SMALL"
    for name in (
        f"MATHEMATICAL {style} {case} {char.upper()}",
        f"{OLDER.get(style, style)} {case} {char.upper()}",  # e.g. ℝ, ℒ, ℭ
    ):
        try:
            return unicodedata.lookup(name)
        except KeyError:
            continue
    return char


def _styled_mi(match: re.Match[str]) -> str:
    variant, text = match["variant"], html.unescape(match["text"])
    if variant == "normal" or variant not in STYLES:
        return match[0]
    letters = "".join(styled_letter(char, variant) for char in text)
    if letters == text:
        return match[0]
    return f"<mi>{html.escape(letters)}</mi>"


def to_mathml(tex: str, display: bool) -> str:
    """One formula as a ``<math>`` element."""
    # latex2mathml keeps the backslash of an escaped underscore inside text
    tex = TEXT_COMMAND.sub(lambda m: "\\" + m[1] + "{" + m[2].replace("\\_", "_") + "}", tex)
    mathml = latex2mathml.converter.convert(tex.strip(), display="block" if display else "inline")
    mathml = OPERATOR_NAME.sub(lambda m: m[1] + THIN_SPACE, mathml)
    return STYLED_MI.sub(_styled_mi, mathml)


def render(page_html: str) -> tuple[str, int]:
    """``page_html`` with every arithmatex formula as MathML, and how many there were."""
    count = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal count
        count += 1
        display = match["open"] == "\\["
        mathml = to_mathml(html.unescape(match["tex"]), display)
        tag = match["tag"]
        return f'<{tag} class="arithmatex">{mathml}</{tag}>'

    return FORMULA.sub(replace, page_html), count
