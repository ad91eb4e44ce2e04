# cython: language_level=3, boundscheck=False, wraparound=False, binding=False
"""The hot path of ``cache_aware`` in C: the prompt found, its prefix keys hashed and looked up.

The same results as kiban.gateway.prefix_scan's Python code (its docstring says what each
function does) without a memoryview, a slice and an argument parse per prefix. xxh3 comes
from Debian's ``libxxhash-dev``: on x86-64 its library's run-time choice of SIMD (AVX2
halves the instructions of SSE2, which the ``xxhash`` wheel runs), elsewhere inlined.
"""

from cpython.dict cimport PyDict_Check, PyDict_GetItemWithError
from cpython.ref cimport PyObject

cdef extern from *:
    """
    #if defined(__x86_64__)
      /* Debian's libxxhash picks SSE2, AVX2 or AVX-512 as the CPU has them (setup.py links it) */
      #include <xxh_x86dispatch.h>
    #else
      /* elsewhere (aarch64: NEON) the compiler's choice, inlined */
      #define XXH_INLINE_ALL
      #include <xxhash.h>
    #endif
    """
    unsigned long long XXH3_64bits(const void *data, size_t length) nogil

cdef extern from "<string.h>":
    const void *memmem(const void *haystack, size_t haystack_length,
                       const void *needle, size_t needle_length) nogil

cdef enum:
    FIRST_BOUNDARY = 512
    MAX_PREFIXES = 64  # 512 * 1.5 ** 63 bytes: more than any body


cdef Py_ssize_t _prompt_at(bytes body):
    cdef const char *data = body
    cdef const char *found = <const char *>memmem(data, len(body), b'"messages"', 10)
    if found is NULL:
        found = <const char *>memmem(data, len(body), b'"prompt"', 8)
    return -1 if found is NULL else found - data


cdef int _sizes(Py_ssize_t length, Py_ssize_t *sizes):
    """Fill *sizes* with the prefix lengths up to *length*, shortest first; return how many."""
    cdef Py_ssize_t size = FIRST_BOUNDARY
    cdef int count = 0
    while size <= length and count < MAX_PREFIXES:
        sizes[count] = size
        count += 1
        size += size // 2
    return count


def prompt_at(bytes body not None):
    return _prompt_at(body)


def prefix_keys(bytes body not None, Py_ssize_t start, Py_ssize_t skip=0):
    if start < 0 or start > len(body):
        raise ValueError(f"start {start} is outside a {len(body)}-byte body")
    cdef Py_ssize_t sizes[MAX_PREFIXES]
    cdef int i, count = _sizes(len(body) - start, sizes) - max(skip, 0)  # < 0: none
    cdef const char *prompt = <const char *>body + start
    return [XXH3_64bits(prompt, sizes[i]) for i in range(count)]


def longest_known(index, bytes body not None, double min_match, Py_ssize_t skip=0):
    if not PyDict_Check(index):  # an OrderedDict is one
        raise TypeError(f"index must be a dict, not {type(index).__name__}")
    cdef Py_ssize_t start = _prompt_at(body)
    if start < 0 or len(body) - start < FIRST_BOUNDARY:
        return -1, [], None
    cdef Py_ssize_t sizes[MAX_PREFIXES]
    cdef int i = _sizes(len(body) - start, sizes) - max(skip, 0)
    cdef const char *prompt = <const char *>body + start
    cdef double need = min_match * (len(body) - start)
    cdef PyObject *held
    cdef list keys = []
    while i > 0:
        i -= 1
        if sizes[i] < need:
            break
        key = XXH3_64bits(prompt, sizes[i])
        keys.append(key)
        held = PyDict_GetItemWithError(index, key)
        if held is not NULL:
            return start, keys, <object>held
    return start, keys, None
