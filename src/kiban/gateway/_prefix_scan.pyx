# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, binding=False
"""The prefix index of ``cache_aware`` in C: prompts found, prefixes hashed, looked up, recorded.

The same behaviour as kiban.gateway.prefix_scan.PythonPrefixIndex (its docstrings say what
each method does) without a Python object per key: keys, engine masks and the LRU order
live in C arrays (an open-addressing table with linear probing over entries linked from
least to most recently used), grown as the index fills. xxh3 is inlined from Debian's
``libxxhash-dev`` header: SSE2 on x86-64 (not AVX2 or AVX-512: see the comment below),
NEON on aarch64.
"""

from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport int32_t, uint64_t

cdef extern from *:
    """
    #if defined(__x86_64__) && !defined(XXH_VECTOR)
      /* SSE2 even where the CPU has more: libxxhash's run-time dispatch chose AVX-512 on a
         Xeon, and the gateway paid ~11 µs a request for it in all its other code; AVX2
         saved nothing measurable over SSE2 (docs/benchmarks.md, "No wide vectors") */
      #define XXH_VECTOR 1 /* XXH_SSE2 */
    #endif
    #define XXH_INLINE_ALL
    #include <xxhash.h>
    """
    unsigned long long XXH3_64bits(const void *data, size_t length) nogil

cdef extern from "<string.h>":
    const void *memmem(const void *haystack, size_t haystack_length,
                       const void *needle, size_t needle_length) nogil

cdef enum:
    FIRST_BOUNDARY = 512
    MAX_CUTS = 64  # 512 * 1.5 ** 63 bytes: more than any body
    NONE = -1  # no entry (an empty table slot, the end of the LRU list)
    FIRST_ENTRIES = 1024
    MAX_CAPACITY = 1 << 30  # entries are numbered in int32


cdef Py_ssize_t _prompt_at(bytes body):
    """Offset of ``"messages"`` in *body*, else of ``"prompt"``; -1 without either."""
    cdef const char *data = body
    cdef const char *found = <const char *>memmem(data, len(body), b'"messages"', 10)
    if found is NULL:
        found = <const char *>memmem(data, len(body), b'"prompt"', 8)
    return -1 if found is NULL else found - data


cdef int _cuts(bytes body, Py_ssize_t start, Py_ssize_t *sizes):
    """Fill *sizes* with the prefix lengths of the prompt at *start*, shortest first."""
    cdef Py_ssize_t length = len(body) - start, size = FIRST_BOUNDARY
    cdef int count = 0
    while size <= length and count < MAX_CUTS:
        sizes[count] = size
        count += 1
        size += size // 2
    return count


cdef class PrefixIndex:
    cdef readonly Py_ssize_t capacity
    cdef readonly Py_ssize_t evictions
    cdef Py_ssize_t used, allocated
    cdef size_t slot_mask
    cdef int32_t *slots  # entry number or NONE; at most half full
    cdef uint64_t *key_of  # per entry: the prefix key,
    cdef uint64_t *mask_of  # the engines that were sent it,
    cdef int32_t *older  # and its neighbours in the LRU list
    cdef int32_t *newer
    cdef int32_t oldest, newest
    # the lookup under way: find, find_shorter, then hit or miss
    cdef bytes body
    cdef Py_ssize_t start
    cdef double need
    cdef int next_cut  # the next prefix to hash, counting down to the shortest; -1: none left
    cdef int hashed  # keys computed, longest first, in found
    cdef Py_ssize_t sizes[MAX_CUTS]
    cdef uint64_t found[MAX_CUTS]

    def __cinit__(self, Py_ssize_t capacity):
        if not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(f"capacity {capacity} is outside 1 to {MAX_CAPACITY}")
        self.capacity = capacity
        self.oldest = self.newest = NONE
        self.start = -1
        self._grow_entries(min(capacity, FIRST_ENTRIES))
        self._grow_slots(4 * self.allocated)

    def __dealloc__(self):
        PyMem_Free(self.slots)
        PyMem_Free(self.key_of)
        PyMem_Free(self.mask_of)
        PyMem_Free(self.older)
        PyMem_Free(self.newer)

    def __len__(self):
        return self.used

    def find(self, bytes body not None, double min_match):
        cdef Py_ssize_t start = _prompt_at(body)
        self.hashed = 0
        if start < 0 or len(body) - start < FIRST_BOUNDARY:
            self.start, self.next_cut, self.body = -1, -1, None
            return -1
        self.body, self.start = body, start
        self.need = min_match * (len(body) - start)
        self.next_cut = _cuts(body, start, self.sizes) - 1
        return self._next_held()

    def find_shorter(self):
        return -1 if self.start < 0 else self._next_held()

    def hit(self, uint64_t bit):
        cdef int i = self.hashed
        while i > 0:  # the matched prefix first, the longest most recent
            i -= 1
            self._record(self.found[i], bit)
        self.body, self.start = None, -1

    def miss(self, uint64_t bit):
        if self.start < 0:
            raise ValueError("miss without a prompt found")
        cdef const char *prompt = <const char *>self.body + self.start
        cdef int i
        for i in range(self.next_cut + 1):  # those not hashed yet, shortest first
            self._record(XXH3_64bits(prompt, self.sizes[i]), bit)
        self.hit(bit)

    def record(self, bytes body not None, uint64_t bit):
        cdef Py_ssize_t start = _prompt_at(body)
        if start < 0:
            return False
        cdef Py_ssize_t sizes[MAX_CUTS]
        cdef int i, count = _cuts(body, start, sizes)
        cdef const char *prompt = <const char *>body + start
        for i in range(count):
            self._record(XXH3_64bits(prompt, sizes[i]), bit)
        return count > 0

    def held_by(self, uint64_t key):
        cdef int32_t entry = self._entry(key)
        return 0 if entry == NONE else self.mask_of[entry]

    def keys(self):
        cdef list out = []
        cdef int32_t entry = self.oldest
        while entry != NONE:
            out.append(self.key_of[entry])
            entry = self.newer[entry]
        return out

    cdef uint64_t _next_held(self):
        """Hash the next prefixes, longest first, to one held; its engines' mask, else 0."""
        cdef const char *prompt = <const char *>self.body + self.start
        cdef uint64_t key
        cdef int32_t entry
        while self.next_cut >= 0 and self.sizes[self.next_cut] >= self.need:
            key = XXH3_64bits(prompt, self.sizes[self.next_cut])
            self.next_cut -= 1
            self.found[self.hashed] = key
            self.hashed += 1
            entry = self._entry(key)
            if entry != NONE:
                return self.mask_of[entry]
        return 0

    cdef int32_t _entry(self, uint64_t key):
        cdef size_t slot = key & self.slot_mask
        cdef int32_t entry
        while True:
            entry = self.slots[slot]
            if entry == NONE or self.key_of[entry] == key:
                return entry
            slot = (slot + 1) & self.slot_mask

    cdef int _record(self, uint64_t key, uint64_t bit) except -1:
        """Mark *bit*'s engine as holding *key*, now the most recently used."""
        cdef int32_t entry = self._entry(key)
        if entry != NONE:
            self.mask_of[entry] |= bit
            if entry != self.newest:
                self._unlink(entry)
                self._append(entry)
            return 0
        if self.used < self.capacity:
            if self.used == self.allocated:
                self._grow_entries(min(2 * self.allocated, self.capacity))
                if 2 * self.allocated > <Py_ssize_t>(self.slot_mask + 1):
                    self._grow_slots(2 * self.allocated)
            entry = <int32_t>self.used
            self.used += 1
        else:  # full: the least recently used one goes
            entry = self.oldest
            self._unlink(entry)
            self._unslot(entry)
            self.evictions += 1
        self.key_of[entry] = key
        self.mask_of[entry] = bit
        self._slot(entry)
        self._append(entry)
        return 0

    cdef void _append(self, int32_t entry):
        self.older[entry] = self.newest
        self.newer[entry] = NONE
        if self.newest != NONE:
            self.newer[self.newest] = entry
        else:
            self.oldest = entry
        self.newest = entry

    cdef void _unlink(self, int32_t entry):
        cdef int32_t before = self.older[entry], after = self.newer[entry]
        if before != NONE:
            self.newer[before] = after
        else:
            self.oldest = after
        if after != NONE:
            self.older[after] = before
        else:
            self.newest = before

    cdef void _slot(self, int32_t entry):
        cdef size_t slot = self.key_of[entry] & self.slot_mask
        while self.slots[slot] != NONE:
            slot = (slot + 1) & self.slot_mask
        self.slots[slot] = entry

    cdef void _unslot(self, int32_t entry):
        """Empty *entry*'s slot, shifting back the entries probed past it (no tombstones)."""
        cdef size_t mask = self.slot_mask, hole = self.key_of[entry] & mask, slot, home
        while self.slots[hole] != entry:
            hole = (hole + 1) & mask
        slot = hole
        while True:
            slot = (slot + 1) & mask
            if self.slots[slot] == NONE:
                break
            home = self.key_of[self.slots[slot]] & mask
            # it stays if its home lies cyclically in (hole, slot]
            if (hole < slot and hole < home <= slot) or (
                hole > slot and (home > hole or home <= slot)
            ):
                continue
            self.slots[hole] = self.slots[slot]
            hole = slot
        self.slots[hole] = NONE

    cdef int _grow_entries(self, Py_ssize_t allocated) except -1:
        self.key_of = <uint64_t *>_realloc(self.key_of, allocated * sizeof(uint64_t))
        self.mask_of = <uint64_t *>_realloc(self.mask_of, allocated * sizeof(uint64_t))
        self.older = <int32_t *>_realloc(self.older, allocated * sizeof(int32_t))
        self.newer = <int32_t *>_realloc(self.newer, allocated * sizeof(int32_t))
        self.allocated = allocated
        return 0

    cdef int _grow_slots(self, Py_ssize_t count) except -1:
        """A table of at least *count* slots (a power of two), every entry slotted again."""
        cdef size_t size = 8
        while size < <size_t>count:
            size *= 2
        cdef int32_t *slots = <int32_t *>_realloc(NULL, size * sizeof(int32_t))
        cdef size_t i
        for i in range(size):
            slots[i] = NONE
        PyMem_Free(self.slots)
        self.slots, self.slot_mask = slots, size - 1
        cdef int32_t entry
        for entry in range(<int32_t>self.used):
            self._slot(entry)
        return 0


cdef void *_realloc(void *memory, size_t size) except NULL:
    cdef void *grown = PyMem_Realloc(memory, size)
    if grown is NULL:
        raise MemoryError()
    return grown
