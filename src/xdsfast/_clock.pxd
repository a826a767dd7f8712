# The compiled cores' one clock (cimported by _h2 and _route; nothing to build).
#
# time.monotonic() / time.perf_counter() without a call into Python: all three read
# CLOCK_MONOTONIC on Linux, the platform the compiled modules are built for, so times
# taken here and in Python mix (/debug/xds, the read-idle checks).

from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9
