"""In-flight counts shared by worker processes (see ``_inflight_py``).

Uses the compiled ``fastpath._inflight_c`` unless ``MESHGATE_NO_EXTENSIONS`` is set or
it is not built, else the pure-Python twin; both stay reachable as ``inflight_c``
(None when not loaded) and ``inflight_py`` so tests can exercise each.
"""

from typing import TYPE_CHECKING

from fastpath import _inflight_py as inflight_py
from fastpath._select import compiled_twin

inflight_c = compiled_twin("_inflight_c")

COMPILED: bool = inflight_c is not None

# Type checkers see the pure-Python twin; the compiled one has the same signatures.
if TYPE_CHECKING or inflight_c is None:
    from fastpath._inflight_py import InflightCounter
else:
    from fastpath._inflight_c import InflightCounter

__all__ = ["COMPILED", "InflightCounter", "inflight_c", "inflight_py"]
