# The compiled twin of _inflight_py: the same API.
from fastpath._inflight_py import InflightCounter as InflightCounter
