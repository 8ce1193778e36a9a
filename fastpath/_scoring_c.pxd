# C types for _scoring_py.py, compiled as fastpath._scoring_c (see setup.py).
# Everything the ranking loop touches is a C value or a typed memoryview, so the
# loop runs without the GIL; keep it that way when editing the .py.
cimport cython

cdef Py_ssize_t QUEUE_DEPTH, INFLIGHT, VRAM_USED, VRAM_TOTAL, KV_FRACTION, TTFT_EWMA
cdef Py_ssize_t READY, CIRCUIT_OPEN, DRAINING, SIGNAL_AT, MAX_AGE, WEIGHT, QUEUE_LIMIT
cdef Py_ssize_t NFIELDS
cdef int POLICY_ROUND_ROBIN, POLICY_LEAST_QUEUE, POLICY_POWER_OF_TWO, POLICY_PREFIX_AFFINITY

cdef unsigned long long _MASK64, _FNV_OFFSET, _FNV_PRIME, _GOLDEN, _MIX_1, _MIX_2
cdef unsigned long long _XORSHIFT_MULT
cdef Py_ssize_t NOGIL_MIN_CANDIDATES


cdef unsigned long long _mix64(unsigned long long x) noexcept nogil


@cython.locals(h="unsigned long long", n=Py_ssize_t, i=Py_ssize_t)
cpdef unsigned long long affinity_hash(const unsigned char[::1] data, Py_ssize_t k)


@cython.final
cdef class Scorer:
    cdef readonly double queue_weight, vram_weight, kv_weight
    cdef readonly double ttft_factor, vram_saturation, queue_saturation
    cdef const double[:, ::1] _state
    cdef readonly object ranked
    cdef int[::1] _ranked
    cdef unsigned long long _rng, _turn
    cdef double[::1] _chosen_at
    cdef int[::1] _slots
    cdef double[::1] _keys
    cdef readonly Py_ssize_t saturated

    @cython.locals(n=Py_ssize_t, count=Py_ssize_t)
    cpdef Py_ssize_t rank(
        self,
        const int[::1] candidates,
        int policy,
        double now,
        unsigned long long affinity_key,
    ) except -1

    @cython.locals(
        n=Py_ssize_t, rows=Py_ssize_t, start=Py_ssize_t, eligible=Py_ssize_t,
        saturated=Py_ssize_t, have_home=bint, home_hash="unsigned long long", home_pos=Py_ssize_t,
        i=Py_ssize_t, j=Py_ssize_t, s=int, weight=double, is_home=bint,
        h="unsigned long long", load=double, limit=double, vram=double,
        key=double, count=Py_ssize_t, first=Py_ssize_t, r="unsigned long long",
        a=Py_ssize_t, b=Py_ssize_t, slots="int[::1]", keys="double[::1]",
        state="const double[:, ::1]",
    )
    cdef Py_ssize_t _rank(
        self,
        const int[::1] candidates,
        int policy,
        double now,
        unsigned long long affinity_key,
    ) noexcept nogil

    @cython.locals(state="const double[:, ::1]", load=double, key=double)
    cpdef double score(self, Py_ssize_t slot) except? -1.0

    @cython.locals(limit=double)
    cdef double _limit(self, Py_ssize_t s) noexcept nogil

    @cython.locals(total=double)
    cdef double _vram(self, Py_ssize_t s) noexcept nogil

    cdef double _score(self, double queue, double vram, double kv, double ttft) noexcept nogil

    @cython.locals(x="unsigned long long")
    cdef unsigned long long _next_random(self) noexcept nogil

    @cython.locals(
        i=Py_ssize_t, j=Py_ssize_t, slot=int, key=double, slots="int[::1]", keys="double[::1]"
    )
    cdef void _select(self, Py_ssize_t first, Py_ssize_t stop, Py_ssize_t eligible) noexcept nogil

    @cython.locals(slot=int, key=double, slots="int[::1]", keys="double[::1]")
    cdef void _swap(self, Py_ssize_t i, Py_ssize_t j) noexcept nogil
