# The compiled twin of _scoring_py: the same source, so the same API.
from fastpath._scoring_py import NOGIL_MIN_CANDIDATES as NOGIL_MIN_CANDIDATES
from fastpath._scoring_py import Scorer as Scorer
from fastpath._scoring_py import ScoringConfig as ScoringConfig
from fastpath._scoring_py import affinity_hash as affinity_hash
