"""Backend scoring: ranks the candidate slots of a model by policy (see ``_scoring_py``).

Uses the compiled ``fastpath._scoring_c`` unless ``MESHGATE_NO_EXTENSIONS`` is set or
it is not built, else the pure-Python twin; both stay reachable as ``scoring_c``
(None when not loaded) and ``scoring_py`` so tests can exercise each.
"""

from typing import TYPE_CHECKING

from fastpath import _scoring_py as scoring_py
from fastpath._select import compiled_twin

scoring_c = compiled_twin("_scoring_c")

COMPILED: bool = scoring_c is not None

# Type checkers see the pure-Python twin; the compiled one has the same signatures.
if TYPE_CHECKING or scoring_c is None:
    from fastpath._scoring_py import Scorer, ScoringConfig, affinity_hash
else:
    from fastpath._scoring_c import Scorer, ScoringConfig, affinity_hash

__all__ = ["COMPILED", "Scorer", "ScoringConfig", "affinity_hash", "scoring_c", "scoring_py"]
