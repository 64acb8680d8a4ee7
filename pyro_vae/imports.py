"""Objects named by an import path, ``package.module:Name``: your own estimator or model.

A configuration holds strings, so that a run folder, a Ray worker or a resumed run can
rebuild what a run used; an import path is how a string names an object of yours. The
part after the colon may be dotted (``package.module:Class.factory``). No torch import
here.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from pyro_vae.errors import UserInputError

#: ``package.module:Name``: dotted identifiers, one colon
_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_import_path(text: Any) -> bool:
    """Whether ``text`` has the form ``package.module:Name``."""
    return isinstance(text, str) and bool(_PATH.match(text))


def import_object(path: str, what: str) -> Any:
    """The object ``path`` (``package.module:Name``) names, or one line saying why not.

    :param path: the import path.
    :param what: what it should be, for the error (``"estimator"``, ``"model factory"``).
    :raises UserInputError: the path is malformed, its module does not import, or the
        module has no such name.
    """
    if not is_import_path(path):
        raise UserInputError(
            f"{what} {path!r} is not an import path: write it as package.module:Name"
        )
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise UserInputError(
            f"{what} {path!r}: module {error.name or module_name!r} is not importable; "
            f"install it or put its folder on PYTHONPATH"
        ) from None
    except Exception as error:  # the user's module failed while importing
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UserInputError(
            f"{what} {path!r}: importing {module_name} failed "
            f"({type(error).__name__}: {first[:200]}); fix the module"
        ) from None
    value: Any = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise UserInputError(
                f"{what} {path!r}: {module_name} has no {attribute!r}; check the name after "
                f"the colon"
            )
        value = getattr(value, part)
    return value


def import_path_of(value: Any) -> str | None:
    """The import path that names ``value`` (a class or function defined at a module's top
    level, or nested in a class), if importing it gives ``value`` back; otherwise
    ``None`` (a lambda, a function defined inside another, anything in ``__main__``)."""
    module = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    path = f"{module}:{qualname}"
    try:
        found = import_object(path, "object")
    except UserInputError:
        return None
    return path if found is value else None
