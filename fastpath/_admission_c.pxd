# C types for _admission_py.py, compiled as fastpath._admission_c (see setup.py).
# admit() and release() touch only C values and typed memoryviews: no Python objects.
cimport cython
from libc cimport math  # the .py's `math.exp` becomes the C function

cdef int ADMIT, REFUSE_SATURATED, REFUSE_OVER_LIMIT, REFUSE_NO_BACKEND
cdef int PRIORITY_CRITICAL, PRIORITY_STANDARD, PRIORITY_SHEDDABLE


@cython.final
cdef class Admitter:
    cdef readonly Py_ssize_t model_capacity
    cdef readonly double sheddable_fraction, retry_after_min, retry_after_max
    cdef readonly double retry_after
    cdef double _inv_tau
    cdef long long[:, ::1] _limits
    cdef long long[::1] _inflight
    cdef double[::1] _rate, _rate_at

    cdef void _set_limits(self, Py_ssize_t row, long long soft, long long hard)

    cpdef Py_ssize_t inflight(self, Py_ssize_t model_index=*) except? -1

    @cython.locals(everything=Py_ssize_t)
    cpdef int admit(
        self, Py_ssize_t model_index, int priority, Py_ssize_t eligible,
        Py_ssize_t saturated, double now,
    ) except -1

    @cython.locals(everything=Py_ssize_t)
    cpdef void release(self, Py_ssize_t model_index, double now) except *

    @cython.locals(excess="long long")
    cdef bint _over_limit(self, Py_ssize_t row, int priority, double now) noexcept

    @cython.locals(dt=double)
    cdef void _completed(self, Py_ssize_t row, double now) noexcept

    @cython.locals(rate=double, dt=double)
    cdef double _retry_after(self, Py_ssize_t row, long long waiting, double now) noexcept

    cdef int _check_model(self, Py_ssize_t model_index) except -1
