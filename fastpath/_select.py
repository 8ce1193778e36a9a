"""How every selector module picks its implementation, so the switch is read one way."""

import importlib
from types import ModuleType

from fastpath import NO_EXTENSIONS


def compiled_twin(name: str) -> ModuleType | None:
    """The compiled ``fastpath.<name>``, or None under MESHGATE_NO_EXTENSIONS=1 or when
    it is not built (the selector then uses the pure-Python twin)."""
    if NO_EXTENSIONS:
        return None
    try:
        return importlib.import_module(f"fastpath.{name}")
    except ImportError:
        return None
