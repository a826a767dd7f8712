# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The DNS proxy's compiled name table (twin: ``_dnstable_py.py``, same API and answers).

``build`` parses the NameTable's wire bytes and applies Istio's naming rules
(``xdsfast.dns.names``) in C with the GIL released, so a 100k-host table costs
the event loop nothing while it is built.  The result is flat buffers:

* ``wires``: name labels in wire form (no root byte); a derived name that is a
  leading part of its hostname (``svc.ns.`` of ``svc.ns.svc.cluster.local.``)
  points into the hostname's bytes instead of repeating them;
* ``names``: one record per name: its labels (offset, length) and either an
  address set, or a CNAME target (another record; the name is the target's
  labels + the search domain, so it takes no bytes of its own);
* ``sets`` / ``addrs``: each NameTable entry's IPv4 then IPv6 addresses;
* ``slots``: an open-addressing hash index (FNV-1a over the lowercased wire
  name) of record numbers.

Replies are written per query into one reused buffer, exactly as the twin's
docstring says (rotation counter included), and copied out as one bytes object.
The records, the table's fields and the cdef signatures are declared in
``_dnstable.pxd``.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, realloc, free, qsort
from libc.string cimport memcpy, memcmp, memchr, memset
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE

cdef extern from "arpa/inet.h" nogil:
    int inet_pton(int af, const char *src, void *dst)

cdef extern from "sys/socket.h" nogil:
    int AF_INET
    int AF_INET6

cdef extern from *:
    """
    /* The cancel flag is set by another thread: read it from memory at every check. */
    static inline int xdsfast_cancelled(const volatile unsigned char *flag) {
        return flag != NULL && *flag != 0;
    }
    """
    int cancelled "xdsfast_cancelled" (const uint8_t* flag) noexcept nogil

# The C constants (_dnstable.pxd), as Python reads them.
ROTATIONS = C_ROTATIONS
MAX_SECTION = C_MAX_SECTION

cdef uint32_t NONE = 0xFFFFFFFFu

cdef uint8_t LOWER[256]
for _i in range(256):
    LOWER[_i] = _i + 32 if 65 <= _i <= 90 else _i

cdef uint64_t _turn = 0  # the round-robin counter: which order the next rotated answer uses


# -- growable buffers (build scratch and the table's own) -------------------------------------

cdef int grow(Buf* b, size_t extra) noexcept nogil:
    cdef size_t want = b.n + extra
    cdef size_t cap
    cdef uint8_t* q
    if want <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 256
    while cap < want:
        cap *= 2
    q = <uint8_t*>realloc(b.p, cap)
    if q == NULL:
        return -1
    b.p = q
    b.cap = cap
    return 0


cdef int put(Buf* b, const void* src, size_t n) noexcept nogil:
    if grow(b, n):
        return -1
    memcpy(b.p + b.n, src, n)
    b.n += n
    return 0


cdef void shrink(Buf* b) noexcept nogil:
    cdef uint8_t* q
    if b.n and b.n < b.cap:
        q = <uint8_t*>realloc(b.p, b.n)
        if q != NULL:
            b.p = q
            b.cap = b.n


# -- protobuf wire reading ----------------------------------------------------------------------

cdef inline int varint(const uint8_t* p, size_t n, size_t* pos, uint64_t* out) noexcept nogil:
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef uint8_t b
    while True:
        if pos[0] >= n or shift > 63:
            return -1
        b = p[pos[0]]
        pos[0] += 1
        v |= (<uint64_t>(b & 0x7F)) << shift
        if b < 0x80:
            out[0] = v
            return 0
        shift += 7


cdef int skip(const uint8_t* p, size_t n, size_t* pos, uint64_t tag, int depth) noexcept nogil:
    """Skip one field's value (tag already read); groups to their end, nested."""
    cdef uint64_t v
    cdef uint64_t t
    cdef int wt = tag & 7
    if wt == 0:
        return varint(p, n, pos, &v)
    if wt == 1 or wt == 5:
        v = 8 if wt == 1 else 4
        if n - pos[0] < v:
            return -1
        pos[0] += v
        return 0
    if wt == 2:
        if varint(p, n, pos, &v) or v > n - pos[0]:
            return -1
        pos[0] += v
        return 0
    if wt == 3 and depth < 100:
        while True:
            if varint(p, n, pos, &t):
                return -1
            if (t & 7) == 4:
                return 0 if (t >> 3) == (tag >> 3) else -1
            if skip(p, n, pos, t, depth + 1):
                return -1
    return -1


cdef inline int field(const uint8_t* p, size_t n, size_t* pos, uint64_t* tag, Str* s) noexcept nogil:
    """Read a tag; for a length-delimited value, point ``s`` at it; else skip the value."""
    cdef uint64_t v
    if varint(p, n, pos, tag):
        return -1
    if (tag[0] & 7) == 2:
        if varint(p, n, pos, &v) or v > n - pos[0]:
            return -1
        s.p = p + pos[0]
        s.n = v
        pos[0] += v
        return 0
    s.p = NULL
    s.n = 0
    return skip(p, n, pos, tag[0], 0)


cdef int entry_cmp(const void* a, const void* b) noexcept nogil:
    cdef const Entry* x = <const Entry*>a
    cdef const Entry* y = <const Entry*>b
    cdef size_t n = x.klen if x.klen < y.klen else y.klen
    cdef int c = memcmp(x.key, y.key, n)
    if c:
        return c
    return (x.klen > y.klen) - (x.klen < y.klen)


cdef int parse_entries(const uint8_t* p, size_t n, Buf* out) noexcept nogil:
    """The map's entries (key, value) in wire order."""
    cdef size_t pos = 0
    cdef size_t epos
    cdef uint64_t tag
    cdef uint64_t etag
    cdef Str s
    cdef Str e
    cdef Entry entry
    cdef int have_value
    while pos < n:
        if field(p, n, &pos, &tag, &s):
            return MALFORMED
        if tag != ((1 << 3) | 2):
            if (tag >> 3) == 1:
                return NONCANONICAL
            continue
        memset(&entry, 0, sizeof(Entry))
        entry.key = <const uint8_t*>""
        entry.aset = NONE
        entry.own_off = NONE
        have_value = 0
        epos = 0
        while epos < s.n:
            if field(s.p, s.n, &epos, &etag, &e):
                return MALFORMED
            if etag == ((1 << 3) | 2):
                entry.key = e.p
                entry.klen = <uint32_t>e.n
            elif etag == ((2 << 3) | 2):
                if have_value:
                    return NONCANONICAL  # protobuf merges repeated values
                have_value = 1
                entry.val = <uint32_t>(e.p - p)
                entry.vlen = <uint32_t>e.n
            elif (etag >> 3) in (1, 2):
                return NONCANONICAL
        if put(out, &entry, sizeof(Entry)):
            return NOMEM
    return OK


# -- naming rules -------------------------------------------------------------------------------

cdef int parse_info(const uint8_t* p, size_t n, Info* info, Buf* v4, Buf* v6) noexcept nogil:
    """Singular fields (the last of each wins) and the addresses, packed by family."""
    cdef size_t pos = 0
    cdef uint64_t tag
    cdef Str s
    cdef char text[64]
    cdef uint8_t packed[16]
    memset(info, 0, sizeof(Info))
    while pos < n:
        if field(p, n, &pos, &tag, &s):
            return MALFORMED
        if tag == ((1 << 3) | 2):
            if s.n >= 64 or memchr(s.p, 0, s.n) != NULL:
                continue
            memcpy(text, s.p, s.n)
            text[s.n] = 0
            if inet_pton(AF_INET, text, packed) == 1:
                if put(v4, packed, 4):
                    return NOMEM
            elif inet_pton(AF_INET6, text, packed) == 1:
                if put(v6, packed, 16):
                    return NOMEM
        elif tag == ((2 << 3) | 2):
            info.registry = s
        elif tag == ((3 << 3) | 2):
            info.shortname = s
        elif tag == ((4 << 3) | 2):
            info.namespace = s
    return OK


cdef inline int ends_with(Str a, Str b) noexcept nogil:
    return a.n >= b.n and memcmp(a.p + a.n - b.n, b.p, b.n) == 0


cdef inline int equal(Str a, Str b) noexcept nogil:
    return a.n == b.n and memcmp(a.p, b.p, a.n) == 0


cdef int add_name(Buf* text, Buf* cands, Str a, Str b, Str c, int dots) noexcept nogil:
    """Append the name ``a.b.c.`` (``dots``: how many of a, b, c; each then a dot) in its
    canonical spelling (ASCII lowercased, a trailing ``..`` made ``.``) and its wire form."""
    cdef Cand cand
    cdef Str parts[3]
    cdef size_t i
    cdef size_t j
    cdef size_t start
    cdef size_t label
    cdef uint8_t ch
    cdef int ascii = 1
    cdef uint8_t* d
    parts[0] = a
    parts[1] = b
    parts[2] = c
    cand.dot_off = <uint32_t>text.n
    for i in range(<size_t>dots):
        if grow(text, parts[i].n + 1):
            return -1
        for j in range(parts[i].n):
            ch = parts[i].p[j]
            if ch >= 0x80:
                ascii = 0
            text.p[text.n + j] = ch
        text.n += parts[i].n
        text.p[text.n] = 46  # "."
        text.n += 1
    if ascii:
        for j in range(cand.dot_off, text.n):
            text.p[j] = LOWER[text.p[j]]
    cand.dot_len = <uint32_t>(text.n - cand.dot_off)
    d = text.p + cand.dot_off
    if cand.dot_len > 2 and d[cand.dot_len - 1] == 46 and d[cand.dot_len - 2] == 46:
        cand.dot_len -= 1
        text.n -= 1
    # wire form: each label's length then its bytes; "." alone is the root (no labels)
    cand.wire_off = <uint32_t>text.n
    cand.wire_len = -1
    if ascii and cand.dot_len + 1 <= 255:
        if grow(text, cand.dot_len + 1):
            return -1
        d = text.p + cand.dot_off
        if cand.dot_len == 1:
            cand.wire_len = 0
        else:
            start = 0
            cand.wire_len = 0
            for i in range(cand.dot_len):
                if d[i] == 46:
                    label = i - start
                    if label == 0 or label > 63:
                        cand.wire_len = -1
                        break
                    text.p[text.n] = <uint8_t>label
                    memcpy(text.p + text.n + 1, d + start, label)
                    text.n += label + 1
                    start = i + 1
            if cand.wire_len == 0:
                cand.wire_len = <int32_t>(text.n - cand.wire_off)
            else:
                text.n = cand.wire_off
    if put(cands, &cand, sizeof(Cand)):
        return -1
    return 0


cdef int entry_names(const uint8_t* wire, Entry* entry, Rules* r, Buf* text, Buf* cands) noexcept nogil:
    """Istio's names of one entry (``names.entry_names``), own hostname first; duplicates are
    harmless (the table keeps a name's first claim)."""
    cdef Info info
    cdef Buf unused4
    cdef Buf unused6
    cdef Str host
    cdef Str empty
    cdef Str s
    cdef size_t pos = 0
    cdef uint64_t tag
    cdef const uint8_t* p = wire + entry.val
    cdef size_t n = entry.vlen
    text.n = 0
    cands.n = 0
    memset(&unused4, 0, sizeof(Buf))
    memset(&unused6, 0, sizeof(Buf))
    empty.p = <const uint8_t*>""
    empty.n = 0
    host.p = entry.key
    host.n = entry.klen
    # the addresses were taken earlier: parse the strings only (no IP parse, nothing kept)
    memset(&info, 0, sizeof(Info))
    while pos < n:
        if field(p, n, &pos, &tag, &s):
            return -1
        if tag == ((2 << 3) | 2):
            info.registry = s
        elif tag == ((3 << 3) | 2):
            info.shortname = s
        elif tag == ((4 << 3) | 2):
            info.namespace = s
    s.p = <const uint8_t*>"Kubernetes"
    s.n = 10
    if not equal(info.registry, s):
        if host.n and host.p[host.n - 1] == 46:
            host.n -= 1  # the dot comes back below
        return add_name(text, cands, host, empty, empty, 1)
    if host.n and host.p[host.n - 1] == 46:
        return 0
    if add_name(text, cands, host, empty, empty, 1):
        return -1
    if not (r.domain.n and ends_with(host, r.domain)):
        return 0
    if info.shortname.n and info.namespace.n:
        if add_name(text, cands, info.shortname, info.namespace, empty, 2):
            return -1
        if equal(info.namespace, r.ns):
            if add_name(text, cands, info.shortname, empty, empty, 1):
                return -1
        if add_name(text, cands, info.shortname, info.namespace, r.first, 3):
            return -1
    pos = 0
    while pos < n:
        if field(p, n, &pos, &tag, &s):
            return -1
        if tag == ((5 << 3) | 2):
            if add_name(text, cands, s, empty, empty, 1):
                return -1
    return 0


# -- the table ----------------------------------------------------------------------------------

cdef inline int question_family(const uint8_t* p, size_t qend) noexcept nogil:
    """The question ending at ``qend``: 0 for A, 1 for AAAA (class IN), -1 for anything else."""
    if p[qend - 4] or p[qend - 2] or p[qend - 1] != 1:
        return -1
    if p[qend - 3] == 1:
        return 0
    if p[qend - 3] == 28:
        return 1
    return -1


cdef inline uint32_t hash_of(const uint8_t* q, size_t n) noexcept nogil:
    """FNV-1a, then a final mix: FNV's low bits (the index's) are weak on their own."""
    cdef uint32_t h = 2166136261u
    cdef size_t i
    for i in range(n):
        h = (h ^ q[i]) * 16777619u
    h ^= h >> 15
    h *= 0x85EBCA6Bu
    h ^= h >> 13
    return h


cdef class CompiledTable:
    """The names of one NameTable, ready to answer; immutable once built."""

    def __dealloc__(self):
        free(self.wires.p)
        free(self.names_buf.p)
        free(self.sets.p)
        free(self.addrs.p)
        free(self.slots)

    @property
    def nbytes(self):
        """Bytes this table holds (its buffers and index)."""
        return (self.wires.cap + self.names_buf.cap + self.sets.cap + self.addrs.cap
                + (<size_t>self.mask + 1) * 4 + 65536 + 512)

    # -- names -----------------------------------------------------------------------------

    cdef inline Name* rec(self, uint32_t i) noexcept nogil:
        return (<Name*>self.names_buf.p) + i

    cdef size_t spell(self, uint32_t i, uint8_t* into) noexcept nogil:
        """The wire form of record ``i`` (root included) into ``into``; its length."""
        cdef Name* r = self.rec(i)
        cdef Name* t
        if r.cname:
            t = self.rec(r.ref)
            memcpy(into, self.wires.p + t.off, t.len)
            memcpy(into + t.len, self.swire, self.swire_n)
            return t.len + self.swire_n
        memcpy(into, self.wires.p + r.off, r.len)
        into[r.len] = 0
        return r.len + 1

    cdef inline int same(self, uint32_t i, const uint8_t* q, size_t n) noexcept nogil:
        cdef Name* r = self.rec(i)
        cdef Name* t
        if r.cname:
            t = self.rec(r.ref)
            return (n == t.len + self.swire_n and memcmp(q, self.wires.p + t.off, t.len) == 0
                    and memcmp(q + t.len, self.swire, self.swire_n) == 0)
        return n == <size_t>r.len + 1 and q[r.len] == 0 and memcmp(q, self.wires.p + r.off, r.len) == 0

    cdef uint32_t* slot(self, const uint8_t* q, size_t n, uint32_t h) noexcept nogil:
        """The slot holding the lowercased wire name ``q`` (hash ``h``), or the empty one it
        would take.  A slot is the record number + 1 in its low 24 bits, and the top 8 bits
        of the name's hash (most probes of another name end there, without reading it)."""
        cdef uint32_t tag = h >> 24
        cdef uint32_t pos = h
        cdef uint32_t* s
        while True:
            s = self.slots + (pos & self.mask)
            if s[0] == 0 or ((s[0] >> 24) == tag and self.same((s[0] & 0xFFFFFF) - 1, q, n)):
                return s
            pos += 1

    cdef int64_t find(self, const uint8_t* raw, size_t n) noexcept nogil:
        """Record number of a name as the client spelled it (any case); -1 if absent."""
        cdef uint8_t q[256]
        cdef size_t i
        cdef uint32_t* s
        if n > 255 or self.slots == NULL:
            return -1
        for i in range(n):
            q[i] = LOWER[raw[i]]
        s = self.slot(q, n, hash_of(q, n))
        return <int64_t>(s[0] & 0xFFFFFF) - 1

    cdef int rehash(self, size_t size) noexcept nogil:
        cdef uint32_t* old = self.slots
        cdef size_t oldsize = <size_t>self.mask + 1 if old != NULL else 0
        cdef size_t i
        cdef uint32_t pos
        self.slots = <uint32_t*>malloc(size * 4)
        if self.slots == NULL:
            self.slots = old
            return -1
        memset(self.slots, 0, size * 4)
        self.mask = <uint32_t>(size - 1)
        for i in range(oldsize):
            if old[i]:
                pos = self.rec((old[i] & 0xFFFFFF) - 1).hash
                while self.slots[pos & self.mask]:
                    pos += 1
                self.slots[pos & self.mask] = old[i]
        free(old)
        return 0

    cdef int64_t insert(self, const uint8_t* labels, size_t n, Name* name) noexcept nogil:
        """Add ``name`` (whose wire form is ``labels`` + the root, or + the search domain
        for a CNAME) unless the table has it.  Returns the record number of the name
        (new or not); -1 out of memory, -2 more than 2**24 - 2 names."""
        cdef uint8_t q[512]
        cdef size_t qn
        cdef uint32_t* s
        cdef uint32_t count = <uint32_t>(self.names_buf.n // sizeof(Name))
        if count >= 0xFFFFFE:
            return -2
        if self.slots == NULL or (<size_t>count + 1) * 4 > (<size_t>self.mask + 1) * 3:
            if self.rehash((<size_t>self.mask + 1) * 2 if self.slots != NULL else 1024):
                return -1
        memcpy(q, labels, n)
        if name.cname:
            memcpy(q + n, self.swire, self.swire_n)
            qn = n + self.swire_n
        else:
            q[n] = 0
            qn = n + 1
        name.hash = hash_of(q, qn)
        s = self.slot(q, qn, name.hash)
        if s[0]:
            return <int64_t>(s[0] & 0xFFFFFF) - 1
        if put(&self.names_buf, name, sizeof(Name)):
            return -1
        s[0] = ((name.hash >> 24) << 24) | (count + 1)
        self.names += 1
        return count

    # -- the build -------------------------------------------------------------------------

    cdef int compile(self, const uint8_t* wire, size_t size, Rules* r,
                     const uint8_t* cancel) noexcept nogil:
        cdef Buf entries
        cdef Buf v4
        cdef Buf v6
        cdef Buf text
        cdef Buf cands
        cdef Entry* e
        cdef Entry* es
        cdef Cand* c
        cdef Info info
        cdef AddrSet aset
        cdef Name name
        cdef size_t count
        cdef size_t i
        cdef size_t j
        cdef int64_t found
        cdef int status
        cdef int shared
        cdef Py_ssize_t before
        cdef const uint8_t* w
        cdef const uint8_t* d
        memset(&entries, 0, sizeof(Buf))
        memset(&v4, 0, sizeof(Buf))
        memset(&v6, 0, sizeof(Buf))
        memset(&text, 0, sizeof(Buf))
        memset(&cands, 0, sizeof(Buf))
        if cancelled(cancel):
            return CANCELLED
        status = parse_entries(wire, size, &entries)
        if status != OK:
            return status
        count = entries.n // sizeof(Entry)
        es = <Entry*>entries.p
        if cancelled(cancel):  # before the sort, which takes 20-40 ms at 100k hosts
            free(entries.p)
            return CANCELLED
        if count:
            qsort(es, count, sizeof(Entry), entry_cmp)
        for i in range(1, count):
            if entry_cmp(es + i - 1, es + i) == 0:
                free(entries.p)
                return NONCANONICAL  # a repeated key: protobuf keeps the last
        self.hosts = <Py_ssize_t>count
        status = OK
        i = 1024
        while i < count * 4:  # about the names of Kubernetes services; grows if need be
            i *= 2
        if self.rehash(i):
            status = NOMEM
        # addresses, and each entry's own name (own hostnames win over derived names)
        for i in range(count):
            if status == OK and i % CANCEL_EVERY == 0 and cancelled(cancel):
                status = CANCELLED
            if status != OK:
                break
            e = es + i
            v4.n = 0
            v6.n = 0
            if parse_info(wire + e.val, e.vlen, &info, &v4, &v6):
                status = MALFORMED
                break
            if v4.n == 0 and v6.n == 0:
                continue
            aset.off = <uint32_t>self.addrs.n
            aset.n4 = <uint32_t>(v4.n // 4)
            aset.n6 = <uint32_t>(v6.n // 16)
            e.aset = <uint32_t>(self.sets.n // sizeof(AddrSet))
            if (put(&self.addrs, v4.p, v4.n) or put(&self.addrs, v6.p, v6.n)
                    or put(&self.sets, &aset, sizeof(AddrSet))):
                status = NOMEM
                break
            if entry_names(wire, e, r, &text, &cands):
                status = NOMEM
                break
            if cands.n == 0:
                e.aset = NONE
                continue
            c = <Cand*>cands.p
            if c.wire_len < 0:
                continue
            name.off = <uint32_t>self.wires.n
            name.len = <uint8_t>c.wire_len
            name.ref = e.aset
            name.cname = 0
            if put(&self.wires, text.p + c.wire_off, c.wire_len):
                status = NOMEM
                break
            before = self.names
            found = self.insert(self.wires.p + name.off, c.wire_len, &name)
            if found < 0:
                status = NOMEM if found == -1 else TOOMANY
                break
            if self.names == before:
                self.wires.n = name.off  # claimed already: the same bytes are stored
            e.own_off = self.rec(<uint32_t>found).off
            e.own_len = <uint32_t>c.wire_len
        # derived names, in hostname order
        for i in range(count):
            if status == OK and i % CANCEL_EVERY == 0 and cancelled(cancel):
                status = CANCELLED
            if status != OK:
                break
            e = es + i
            if e.aset == NONE:
                continue
            if entry_names(wire, e, r, &text, &cands):
                status = NOMEM
                break
            for j in range(1, cands.n // sizeof(Cand)):
                c = (<Cand*>cands.p) + j
                if c.wire_len < 0:
                    continue
                w = text.p + c.wire_off
                shared = (e.own_off != NONE and <uint32_t>c.wire_len <= e.own_len
                          and memcmp(self.wires.p + e.own_off, w, c.wire_len) == 0)
                if shared:
                    name.off = e.own_off  # a leading part of the hostname: share its bytes
                else:
                    name.off = <uint32_t>self.wires.n
                    if put(&self.wires, w, c.wire_len):
                        status = NOMEM
                        break
                name.len = <uint8_t>c.wire_len
                name.ref = e.aset
                name.cname = 0
                before = self.names
                found = self.insert(self.wires.p + name.off, c.wire_len, &name)
                if found < 0:
                    status = NOMEM if found == -1 else TOOMANY
                    break
                if self.names == before and not shared:
                    self.wires.n = name.off
        # search-domain CNAMEs: name + suffix -> name, for names not already in the domain
        for i in range(count):
            if status == OK and i % CANCEL_EVERY == 0 and cancelled(cancel):
                status = CANCELLED
            if status != OK or self.swire_n == 0:
                break
            e = es + i
            if e.aset == NONE:
                continue
            if entry_names(wire, e, r, &text, &cands):
                status = NOMEM
                break
            for j in range(cands.n // sizeof(Cand)):
                c = (<Cand*>cands.p) + j
                d = text.p + c.dot_off
                if c.wire_len <= 0:  # not a DNS name, or the root
                    continue
                if c.dot_len >= r.suffix.n and memcmp(d + c.dot_len - r.suffix.n, r.suffix.p, r.suffix.n) == 0:
                    continue
                if <size_t>c.wire_len + self.swire_n > 255:
                    continue
                found = self.find_labels(text.p + c.wire_off, c.wire_len)
                if found < 0:
                    continue  # cannot happen: every DNS name of the entry is in the table
                name.off = self.rec(<uint32_t>found).off
                name.len = self.rec(<uint32_t>found).len
                name.ref = <uint32_t>found
                name.cname = 1
                found = self.insert(self.wires.p + name.off, name.len, &name)
                if found < 0:
                    status = NOMEM if found == -1 else TOOMANY
                    break
        free(entries.p)
        free(v4.p)
        free(v6.p)
        free(text.p)
        free(cands.p)
        shrink(&self.wires)
        shrink(&self.names_buf)
        shrink(&self.sets)
        shrink(&self.addrs)
        return status

    cdef int64_t find_labels(self, const uint8_t* labels, size_t n) noexcept nogil:
        cdef uint8_t q[256]
        if n > 254:
            return -1
        memcpy(q, labels, n)
        q[n] = 0
        return self.find(q, n + 1)

    # -- replies ---------------------------------------------------------------------------

    cdef Py_ssize_t compose(self, const uint8_t* data, size_t qend, int64_t i, int aaaa,
                            int64_t order, size_t limit) noexcept:
        """Write the reply into ``self.out``; its length, or -1 if over ``limit`` (the
        round-robin counter has moved on all the same, as it always did)."""
        global _turn
        cdef Name* r = self.rec(<uint32_t>i)
        cdef Name* t = NULL
        cdef AddrSet* a
        cdef const uint8_t* addrs
        cdef size_t alen = 16 if aaaa else 4
        cdef size_t n
        cdef size_t owner
        cdef size_t prefix = 0
        cdef size_t size
        cdef size_t start = 0
        cdef size_t k
        cdef size_t total
        cdef size_t pos
        cdef size_t idx
        cdef size_t an
        cdef uint8_t* o = self.out
        if r.cname:
            t = self.rec(r.ref)
            a = (<AddrSet*>self.sets.p) + t.ref
        else:
            a = (<AddrSet*>self.sets.p) + r.ref
        n = a.n6 if aaaa else a.n4
        addrs = self.addrs.p + a.off + (a.n4 * 4 if aaaa else 0)
        owner = 2  # a pointer: to the question's name, or to the CNAME record's target
        if n and t != NULL:
            prefix = 12 + t.len + 1
        if n:
            size = owner + 10 + alen
            if prefix + n * size > C_MAX_SECTION:
                n = (C_MAX_SECTION - prefix) // size
        if n > 1:
            if order < 0:
                k = _turn % (n if n < C_ROTATIONS else C_ROTATIONS)
                _turn += 1
            else:
                k = <size_t>order % (n if n < C_ROTATIONS else C_ROTATIONS)
            start = k if n <= C_ROTATIONS else k * n // C_ROTATIONS
        total = qend + prefix + (n * (owner + 10 + alen) if n else 0)
        if total > limit:
            return -1
        an = n + (1 if prefix else 0)
        o[0] = data[0]
        o[1] = data[1]
        o[2] = 0x84 | (data[2] & 1)
        o[3] = data[3] & 0x10
        o[4] = 0
        o[5] = 1
        o[6] = <uint8_t>(an >> 8)
        o[7] = <uint8_t>an
        memset(o + 8, 0, 4)
        memcpy(o + 12, data + 12, qend - 12)
        pos = qend
        if prefix:
            o[pos] = 0xC0
            o[pos + 1] = 0x0C
            o[pos + 2] = 0
            o[pos + 3] = 5
            o[pos + 4] = 0
            o[pos + 5] = 1
            o[pos + 6] = 0
            o[pos + 7] = 0
            o[pos + 8] = 0
            o[pos + 9] = TTL
            o[pos + 10] = 0
            o[pos + 11] = <uint8_t>(t.len + 1)
            memcpy(o + pos + 12, self.wires.p + t.off, t.len)
            o[pos + 12 + t.len] = 0
            pos += prefix
        for k in range(n):
            idx = (start + k) % n
            if t != NULL:  # the target, where the CNAME record spells it (qend + 12)
                o[pos] = <uint8_t>(0xC0 | ((qend + 12) >> 8))
                o[pos + 1] = <uint8_t>((qend + 12) & 0xFF)
            else:
                o[pos] = 0xC0
                o[pos + 1] = 0x0C
            pos += owner
            o[pos] = 0
            o[pos + 1] = 28 if aaaa else 1
            o[pos + 2] = 0
            o[pos + 3] = 1
            o[pos + 4] = 0
            o[pos + 5] = 0
            o[pos + 6] = 0
            o[pos + 7] = TTL
            o[pos + 8] = 0
            o[pos + 9] = <uint8_t>alen
            memcpy(o + pos + 10, addrs + idx * alen, alen)
            pos += 10 + alen
        return <Py_ssize_t>pos

    def fast(self, bytes data):
        """The reply to a plain query (one question, no answer or authority record, at
        most two additional) of a name in the table, if it fits in 512 bytes; else None.

        Nothing past the question is read; the question's end is its first NUL byte."""
        cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(data)
        cdef size_t n = <size_t>PyBytes_GET_SIZE(data)
        cdef const uint8_t* z
        cdef size_t qend
        cdef int aaaa
        cdef int64_t i
        cdef Py_ssize_t size
        if (n < 17 or p[2] & 0xF8 or p[4] or p[5] != 1 or p[6] or p[7] or p[8] or p[9]
                or p[10] or p[11] > 2):
            return None
        z = <const uint8_t*>memchr(p + 12, 0, n - 12)
        if z == NULL:
            return None
        qend = <size_t>(z - p) + 5
        if qend > n:
            return None
        aaaa = question_family(p, qend)
        if aaaa < 0:
            return None
        i = self.find(p + 12, qend - 16)
        if i < 0:
            return None
        size = self.compose(p, qend, i, aaaa, -1, 512)
        if size < 0:
            return None
        return PyBytes_FromStringAndSize(<char*>self.out, size)

    def reply(self, bytes data, Py_ssize_t qend):
        """The whole reply (untruncated) to a validated query whose question ends at
        ``qend``: A or AAAA, class IN, of a name or under a ``*.`` wildcard (the most
        specific first); None if the table has no answer."""
        cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(data)
        cdef size_t n = <size_t>PyBytes_GET_SIZE(data)
        cdef size_t end
        cdef size_t pos
        cdef int aaaa
        cdef int64_t i
        cdef uint8_t q[260]
        cdef size_t qn
        cdef Py_ssize_t size
        if qend < 17 or <size_t>qend > n or <size_t>qend - 16 > 255:
            return None
        end = <size_t>qend
        aaaa = question_family(p, end)
        if aaaa < 0:
            return None
        i = self.find(p + 12, end - 16)
        if i < 0:
            # "*." + each parent, most specific first; never the bare "*."
            pos = 12
            while p[pos] and pos < end - 4:
                pos += 1 + p[pos]
                if pos >= end - 4 or p[pos] == 0:
                    break
                qn = end - 4 - pos
                if qn + 2 > 255:
                    continue
                q[0] = 1
                q[1] = 42  # "*"
                memcpy(q + 2, p + pos, qn)
                i = self.find(q, qn + 2)
                if i >= 0:
                    break
            if i < 0:
                return None
        size = self.compose(p, end, i, aaaa, -1, 65536 + 512)
        return PyBytes_FromStringAndSize(<char*>self.out, size)

    def sections(self, bytes name, int qtype):
        """The answer section of ``name`` (a lowercased wire name) in each of its orders,
        in round-robin order; None if the table does not have the name."""
        cdef bytes query = b"\0" * 12 + name + bytes((qtype >> 8, qtype & 255, 0, 1))
        cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(query)
        cdef size_t qend = <size_t>len(query)
        cdef int64_t i = self.find(<const uint8_t*>PyBytes_AS_STRING(name), <size_t>len(name))
        cdef Py_ssize_t size
        cdef int aaaa = qtype == 28
        if i < 0:
            return None
        out = []
        for k in range(self.orders(i, aaaa)):
            size = self.compose(p, qend, i, aaaa, k, 65536 + 512)
            out.append(PyBytes_FromStringAndSize(<char*>self.out + qend, size - qend))
        return out

    cdef size_t orders(self, int64_t i, int aaaa) noexcept:
        """How many orders the answer of record ``i`` rotates through."""
        cdef Name* r = self.rec(<uint32_t>i)
        cdef Name* t = self.rec(r.ref) if r.cname else NULL
        cdef AddrSet* a = (<AddrSet*>self.sets.p) + (t.ref if r.cname else r.ref)
        cdef size_t n = a.n6 if aaaa else a.n4
        cdef size_t prefix = 0
        cdef size_t owner = 2  # a pointer, as in ``compose``
        if n and t != NULL:
            prefix = 12 + t.len + 1
        if n and prefix + n * (owner + 10 + (16 if aaaa else 4)) > C_MAX_SECTION:
            n = (C_MAX_SECTION - prefix) // (owner + 10 + (16 if aaaa else 4))
        return 1 if n <= 1 else (n if n < C_ROTATIONS else C_ROTATIONS)

    def __iter__(self):
        """Every question the table answers: name wire + A or AAAA, class IN."""
        cdef uint8_t q[512]
        cdef size_t n
        cdef size_t i
        if self.slots == NULL:
            return
        for i in range(<size_t>self.mask + 1):
            if self.slots[i]:
                n = self.spell((self.slots[i] & 0xFFFFFF) - 1, q)
                name = PyBytes_FromStringAndSize(<char*>q, n)
                yield name + b"\0\x01\0\x01"
                yield name + b"\0\x1c\0\x01"

    def __contains__(self, key):
        if (not isinstance(key, bytes) or len(key) < 5
                or key[len(key) - 4:] not in (b"\0\x01\0\x01", b"\0\x1c\0\x01")):
            return False
        name = key[:len(key) - 4]
        return self.find(<const uint8_t*>PyBytes_AS_STRING(name), <size_t>len(name)) >= 0

    def __len__(self):
        return 2 * self.names


def build(bytes wire, rules, cancel=None):
    """The table for a serialized NameTable under the proxy's rules; None means "re-encode
    the NameTable canonically (protobuf's own serializer) and call again": repeated keys
    or values, which protobuf merges, are left to it.  Raises ValueError if ``wire`` is
    not a NameTable; MemoryError.

    ``cancel``: a buffer (a one-byte ``bytearray``) another thread may set nonzero while
    the build runs; the build looks at it every 1024 hosts and, once it is set, stops
    and returns None (the caller, who set it, knows which None it is)."""
    cdef CompiledTable table = CompiledTable.__new__(CompiledTable)
    cdef Rules r
    cdef bytes ns = rules.namespace.encode("utf-8", "surrogatepass")
    cdef bytes domain = rules.proxy_domain.encode("utf-8", "surrogatepass")
    cdef bytes first = domain.split(b".")[0]
    cdef bytes suffix = rules.search_suffix.encode("utf-8", "surrogatepass")
    cdef int status
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(wire)
    cdef size_t n = <size_t>PyBytes_GET_SIZE(wire)
    cdef Py_buffer flag
    cdef const uint8_t* stop = NULL
    memset(&r, 0, sizeof(Rules))
    r.ns.p = <const uint8_t*>PyBytes_AS_STRING(ns)
    r.ns.n = len(ns)
    r.domain.p = <const uint8_t*>PyBytes_AS_STRING(domain)
    r.domain.n = len(domain)
    r.first.p = <const uint8_t*>PyBytes_AS_STRING(first)
    r.first.n = len(first)
    r.suffix.p = <const uint8_t*>PyBytes_AS_STRING(suffix)
    r.suffix.n = len(suffix)
    if suffix:
        swire = _encode(suffix)
        if swire is not None:
            memcpy(table.swire, PyBytes_AS_STRING(swire), len(swire))
            table.swire_n = len(swire)
    if cancel is not None:
        PyObject_GetBuffer(cancel, &flag, PyBUF_SIMPLE)  # held: the bytes cannot move
        if flag.len < 1:
            PyBuffer_Release(&flag)
            raise ValueError("cancel: a buffer of at least one byte")
        stop = <const uint8_t*>flag.buf
    try:
        with nogil:
            status = table.compile(p, n, &r, stop)
    finally:
        if stop != NULL:
            PyBuffer_Release(&flag)
    if status == NONCANONICAL or status == CANCELLED:
        return None
    if status == MALFORMED:
        raise ValueError("cannot decode NameTable: malformed wire bytes")
    if status == NOMEM:
        raise MemoryError("DNS name table")
    if status == TOOMANY:
        raise ValueError("NameTable has more than 16 million names")
    return table


cdef bytes _encode(bytes dotted):
    """The wire form of a search domain (``a.b.``), as ``wire.encode_name``; None if none."""
    if not dotted.endswith(b".") or len(dotted) + 1 > 255 or not dotted.isascii():
        return None
    out = bytearray()
    for label in dotted[:len(dotted) - 1].split(b"."):
        if not 0 < len(label) < 64:
            return None
        out.append(len(label))
        out += label
    out.append(0)
    return bytes(out)


# -- the relay's verdict without protobuf -------------------------------------------------------

cdef inline int plain_length(const uint8_t* p, size_t n, size_t* pos, size_t* out) noexcept nogil:
    """A minimal varint of at most 4 bytes that fits in what is left; else 0 (not sure)."""
    cdef size_t v = 0
    cdef int shift = 0
    cdef uint8_t b
    while shift < 28:
        if pos[0] >= n:
            return 0
        b = p[pos[0]]
        pos[0] += 1
        v |= (<size_t>(b & 0x7F)) << shift
        if b < 0x80:
            if b == 0 and shift:
                return 0
            if v > n - pos[0]:
                return 0
            out[0] = v
            return 1
        shift += 7
    return 0


cdef int utf8(const uint8_t* p, size_t n) noexcept nogil:
    """1 if ``p[:n]`` is valid UTF-8 (RFC 3629: no overlong form, surrogate or > U+10FFFF)."""
    cdef size_t i = 0
    cdef uint8_t c
    cdef uint8_t lo
    cdef uint8_t hi
    cdef size_t k
    while i < n:
        c = p[i]
        if c < 0x80:
            i += 1
            continue
        lo = 0x80
        hi = 0xBF
        if 0xC2 <= c <= 0xDF:
            k = 1
        elif 0xE0 <= c <= 0xEF:
            k = 2
            if c == 0xE0:
                lo = 0xA0
            elif c == 0xED:
                hi = 0x9F
        elif 0xF0 <= c <= 0xF4:
            k = 3
            if c == 0xF0:
                lo = 0x90
            elif c == 0xF4:
                hi = 0x8F
        else:
            return 0
        if n - i - 1 < k or not (lo <= p[i + 1] <= hi):
            return 0
        i += 2
        k -= 1
        while k:
            if not (0x80 <= p[i] <= 0xBF):
                return 0
            i += 1
            k -= 1
    return 1


cdef int strings(const uint8_t* p, size_t n, uint8_t last_tag) noexcept nogil:
    """1 if ``p[:n]`` is only length-delimited fields 1.. of valid UTF-8 (a NameInfo: tags
    0x0A..0x2A), 0 if not sure."""
    cdef size_t pos = 0
    cdef size_t length
    cdef uint8_t tag
    while pos < n:
        tag = p[pos]
        pos += 1
        if (tag & 7) != 2 or tag < 0x0A or tag > last_tag:
            return 0
        if not plain_length(p, n, &pos, &length) or not utf8(p + pos, length):
            return 0
        pos += length
    return 1


cdef int check(const uint8_t* p, size_t n) noexcept nogil:
    cdef size_t pos = 0
    cdef size_t epos
    cdef size_t length
    cdef size_t elength
    cdef const uint8_t* e
    cdef uint8_t tag
    while pos < n:
        if p[pos] != 0x0A:  # table = 1, length-delimited: anything else, protobuf judges
            return 0
        pos += 1
        if not plain_length(p, n, &pos, &length):
            return 0
        e = p + pos
        pos += length
        epos = 0
        while epos < length:  # a map entry: key = 1 (string), value = 2 (NameInfo)
            tag = e[epos]
            epos += 1
            if tag != 0x0A and tag != 0x12:
                return 0
            if not plain_length(e, length, &epos, &elength):
                return 0
            if tag == 0x0A:
                if not utf8(e + epos, elength):
                    return 0
            elif not strings(e + epos, elength, 0x2A):
                return 0
            epos += elength
    return 1


def accepted(bytes wire):
    """True if protobuf surely decodes ``wire`` as a NameTable (checked in C, no objects:
    well-formed, only NameTable's own fields, every string valid UTF-8, minimal lengths);
    False if not sure (then protobuf judges: its verdict and error are the NACK's)."""
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(wire)
    cdef size_t n = <size_t>PyBytes_GET_SIZE(wire)
    cdef int ok
    if n >= 0x7FFFFFFF:
        return False
    with nogil:
        ok = check(p, n)
    return ok == 1
