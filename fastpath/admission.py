"""Admission control: admits or sheds a request in O(1) (see ``_admission_py``).

Uses the compiled ``fastpath._admission_c`` unless ``MESHGATE_NO_EXTENSIONS`` is set or
it is not built, else the pure-Python twin; both stay reachable as ``admission_c``
(None when not loaded) and ``admission_py`` so tests can exercise each.
"""

from typing import TYPE_CHECKING

from fastpath import _admission_py as admission_py
from fastpath._select import compiled_twin

admission_c = compiled_twin("_admission_c")

COMPILED: bool = admission_c is not None

# Type checkers see the pure-Python twin; the compiled one has the same signatures.
if TYPE_CHECKING or admission_c is None:
    from fastpath._admission_py import AdmissionConfig, Admitter
else:
    from fastpath._admission_c import AdmissionConfig, Admitter

__all__ = ["COMPILED", "AdmissionConfig", "Admitter", "admission_c", "admission_py"]
