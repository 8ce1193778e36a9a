# C types for _tenants_py.py, compiled as fastpath._tenants_c (see setup.py).
# admit(), release() and charge_tokens() touch only C values and typed memoryviews.
cimport cython

cdef int ADMIT, BUCKET_REQUESTS, BUCKET_TOKENS
cdef int REFUSE_TENANT_CONCURRENCY, REFUSE_TENANT_RATE, REFUSE_TENANT_TOKENS
cdef double CONCURRENCY_RETRY_AFTER


@cython.final
cdef class TenantLimiter:
    cdef readonly Py_ssize_t tenants
    cdef readonly double retry_after
    cdef double[:, ::1] _rate, _capacity, _level, _at
    cdef long long[::1] _max_concurrent, _inflight

    @cython.locals(limit="long long")
    cpdef int admit(self, Py_ssize_t tenant, double now) except -1

    cpdef void release(self, Py_ssize_t tenant) except *

    cpdef void charge_tokens(self, Py_ssize_t tenant, double tokens, double now) except *

    cpdef Py_ssize_t inflight(self, Py_ssize_t tenant) except -1

    cpdef double limit(self, Py_ssize_t tenant, int bucket) except? -1

    cpdef double remaining(self, Py_ssize_t tenant, int bucket, double now) except? -1

    @cython.locals(rate=double)
    cpdef double reset(self, Py_ssize_t tenant, int bucket, double now) except? -1

    @cython.locals(rate=double, level=double)
    cdef bint _empty(self, Py_ssize_t tenant, int bucket, double now) noexcept

    @cython.locals(dt=double, level=double)
    cdef void _refill(self, Py_ssize_t tenant, int bucket, double now) noexcept

    cdef int _check(self, Py_ssize_t tenant) except -1

    cdef int _check_bucket(self, int bucket) except -1
