"""Files: atomic writes (a crash leaves the old file or the new one, whole), strict JSON
(non-finite numbers as null with the reason), JSON reading with size and depth limits.

Nothing is written through a symbolic link: a target that is a link is refused, and
while a folder is confined (:func:`confined`, which every run folder's lock does) no
folder between it and the target may be a link either, so that a link planted in a run
folder (``RUN/plots -> ~/photos``) never carries a write out of it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyro_vae.errors import UserInputError

# ---------------------------------------------------------------------- links
#: the folders writes are confined to (pushed by :func:`confined`)
_ROOTS: list[Path] = []


class LinkError(UserInputError):
    """A file or folder pyro-vae was about to write is a symbolic link."""


def _link_refusal(link: Path) -> LinkError:
    return LinkError(
        f"{link} is a symbolic link: pyro-vae never writes through a link (it could point "
        f"out of the folder, at a file of yours); remove the link, or choose another folder"
    )


@contextlib.contextmanager
def confined(root: str | Path) -> Iterator[None]:
    """While active, writes below ``root`` refuse every link between ``root`` and their
    target (``root`` itself, named by the user, may be a link)."""
    folder = Path(os.path.abspath(root))
    _ROOTS.append(folder)
    try:
        yield
    finally:
        # (the last entry for it: confinements may end out of order)
        del _ROOTS[len(_ROOTS) - 1 - _ROOTS[::-1].index(folder)]


def check_no_link(path: str | Path) -> None:
    """Refuse to write ``path`` if it is a link, or if a folder between a confined root
    and it is one (:class:`LinkError`, one line naming the link)."""
    path = Path(os.path.abspath(path))
    if path.is_symlink():
        raise _link_refusal(path)
    for root in _ROOTS:
        if path != root and path.is_relative_to(root):
            current = root
            for part in path.relative_to(root).parts[:-1]:
                current = current / part
                if current.is_symlink():
                    raise _link_refusal(current)


def make_folder(folder: str | Path) -> Path:
    """``folder.mkdir(parents=True, exist_ok=True)``, refusing a link in a confined root."""
    folder = Path(folder)
    check_no_link(folder / "_")
    check_no_link(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ---------------------------------------------------------------------- atomic files
def atomic_write_bytes(data: bytes, path: str | Path, replace: bool = True) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one.

    The temporary file is unique to this writer (``tempfile.mkstemp`` in the same
    folder), fsynced, then renamed over ``path``. If writing fails (disk full, read-only
    file system) the old file stays and the temporary file is removed; the ``OSError``
    keeps its errno, so the caller can say "disk full" rather than "permissions".

    A link at ``path`` (or, in a confined folder, between it and ``path``) is refused:
    see :func:`check_no_link`. ``replace=False``: an existing file is kept and
    :class:`FileExistsError` raised (the rename is then a hard link, which never
    replaces).
    """
    path = Path(path)
    check_no_link(path)
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # (fails with EEXIST if something is there)
            os.unlink(temporary)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError) and not error.filename:
            error.filename = str(path)  # (a write on a descriptor names no file: name it)
        raise
    _fsync_directory(path.parent)


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write a text file through a temporary file and a rename."""
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(value: Any, path: str | Path) -> None:
    """Write ``value`` as standard JSON (see :func:`dumps_json`), atomically."""
    atomic_write_text(dumps_json(value, indent=2) + "\n", path)


def dumps_json(value: Any, indent: int | None = None) -> str:
    """Standard JSON: every non-finite float becomes ``null``, and ``"null_values"``
    (beside the top-level keys of a dict) says which, and what they were."""
    nulls: dict[str, str] = {}

    def clean(item: Any, where: str) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            nulls[where] = "NaN" if math.isnan(item) else ("+inf" if item > 0 else "-inf")
            return None
        if isinstance(item, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(item)]
        return item

    cleaned = clean(value, "")
    if nulls and isinstance(cleaned, dict):
        cleaned["null_values"] = {**cleaned.get("null_values", {}), **nulls}
    return json.dumps(cleaned, indent=indent, allow_nan=False)


def _fsync_directory(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def remove_stale_temporaries(folder: Path, names: tuple[str, ...]) -> None:
    """Remove the temporary files that a killed writer of ``names`` left behind in
    ``folder`` (call while holding the folder's lock); other files are never touched."""
    for name in names:
        for stale in folder.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()


#: a config or run-folder JSON file larger than this is not one (refused, not read)
MAX_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 20


def read_json(path: str | Path, what: str) -> Any:
    """A small JSON file, read defensively: a folder, a device, a huge or deeply nested
    file, or invalid JSON is one clear :class:`UserInputError`."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{what} {path} is a folder, not a JSON file: pass the file")
    try:
        info = path.stat()
    except FileNotFoundError:
        raise UserInputError(f"{what} {path} does not exist: check the path") from None
    except OSError as error:
        raise UserInputError(f"{what} {path} cannot be read ({error.strerror})") from None
    import stat

    if not stat.S_ISREG(info.st_mode):
        raise UserInputError(f"{what} {path} is not a regular file: pass a JSON file")
    if info.st_size > MAX_JSON_BYTES:
        raise UserInputError(
            f"{what} {path} has {info.st_size:,} bytes, more than a config holds "
            f"({MAX_JSON_BYTES:,} at most): pass the right file"
        )
    try:
        text = path.read_text(encoding="utf-8")
        if _depth(text) > MAX_JSON_DEPTH:
            raise UserInputError(
                f"{what} {path} is nested more than {MAX_JSON_DEPTH} levels deep: a config "
                f"has two (sections, then keys)"
            )
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as duplicate:
        raise UserInputError(
            f"{what} {path} gives the key {duplicate.key!r} twice (JSON keeps only the last, "
            f"silently): keep one"
        ) from None
    except UserInputError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserInputError(f"{what} {path} is not valid JSON ({reason}): fix it") from None


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s objects, refusing a key given twice in one object."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _depth(text: str) -> int:
    """The deepest nesting of brackets in a JSON text, strings skipped (no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest
