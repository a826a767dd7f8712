# The DNS name table's compiled core (_dnstable.pyx): its flat records, the table's C
# fields and every cdef signature but the small inline helpers, which stay private to
# the .pyx (varint, field, ends_with, equal, question_family, hash_of, plain_length).
#
# Callbacks the core makes by name on Python objects: build() reads rules.namespace,
# rules.proxy_domain and rules.search_suffix (xdsfast.dns.names.NameRules) and reads its
# cancel flag through the buffer protocol; nothing else, and nothing per query.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

cdef enum:
    C_ROTATIONS = 8  # orders an answer rotates through (Python: ROTATIONS)
    C_MAX_SECTION = 65535 - 12 - 259  # what fits after the header and question (MAX_SECTION)
    TTL = 30  # of every record, as Istio's
    CANCEL_EVERY = 1024  # hosts between two looks at the cancel flag (1-3 ms of work)

cdef enum:  # build status
    OK = 0
    NONCANONICAL = 1  # an encoding this parser leaves to protobuf (re-encode, call again)
    MALFORMED = -1
    NOMEM = -2
    TOOMANY = -3
    CANCELLED = -4  # the caller's cancel flag was set: a newer table supersedes this one

ctypedef struct Buf:  # a growable buffer (build scratch and the table's own)
    uint8_t* p
    size_t n
    size_t cap

ctypedef struct Name:
    uint32_t off  # into wires: the labels (root byte excluded)
    uint32_t ref  # cname == 0: address set; else the target's record
    uint32_t hash  # of the lowercased wire name (the index grows without reading names)
    uint8_t len  # bytes of labels
    uint8_t cname

ctypedef struct AddrSet:
    uint32_t off  # into addrs: n4 IPv4 addresses, then n6 IPv6 addresses
    uint32_t n4
    uint32_t n6

ctypedef struct Entry:  # a NameTable map entry, during the build
    const uint8_t* key
    uint32_t klen
    uint32_t val
    uint32_t vlen
    uint32_t aset  # NONE: no usable address
    uint32_t own_off  # the own name's labels in wires (NONE: not a DNS name)
    uint32_t own_len

ctypedef struct Str:
    const uint8_t* p
    size_t n

ctypedef struct Rules:
    Str ns
    Str domain  # the proxy domain, svc.cluster.local
    Str first  # its first label, svc
    Str suffix  # the first search domain, default.svc.cluster.local. ("" if none)
    uint8_t swire[256]  # its wire form
    size_t swire_n  # 0: no usable search domain

ctypedef struct Info:  # an entry's NameInfo, singular fields
    Str registry
    Str shortname
    Str namespace

ctypedef struct Cand:  # one name of an entry: its dotted form and wire labels in a scratch Buf
    uint32_t dot_off
    uint32_t dot_len
    uint32_t wire_off
    int32_t wire_len  # labels only; -1: not a DNS name


cdef class CompiledTable:
    cdef Buf wires
    cdef Buf names_buf
    cdef Buf sets
    cdef Buf addrs
    cdef uint32_t* slots
    cdef uint32_t mask
    cdef uint8_t swire[256]
    cdef size_t swire_n
    cdef readonly Py_ssize_t hosts
    cdef readonly Py_ssize_t names
    cdef uint8_t out[65536 + 512]

    cdef inline Name* rec(self, uint32_t i) noexcept nogil
    cdef size_t spell(self, uint32_t i, uint8_t* into) noexcept nogil
    cdef inline int same(self, uint32_t i, const uint8_t* q, size_t n) noexcept nogil
    cdef uint32_t* slot(self, const uint8_t* q, size_t n, uint32_t h) noexcept nogil
    cdef int64_t find(self, const uint8_t* raw, size_t n) noexcept nogil
    cdef int rehash(self, size_t size) noexcept nogil
    cdef int64_t insert(self, const uint8_t* labels, size_t n, Name* name) noexcept nogil
    cdef int compile(self, const uint8_t* wire, size_t size, Rules* r,
                     const uint8_t* cancel) noexcept nogil
    cdef int64_t find_labels(self, const uint8_t* labels, size_t n) noexcept nogil
    cdef Py_ssize_t compose(self, const uint8_t* data, size_t qend, int64_t i, int aaaa,
                            int64_t order, size_t limit) noexcept
    cdef size_t orders(self, int64_t i, int aaaa) noexcept


cdef int grow(Buf* b, size_t extra) noexcept nogil
cdef int put(Buf* b, const void* src, size_t n) noexcept nogil
cdef void shrink(Buf* b) noexcept nogil
cdef int skip(const uint8_t* p, size_t n, size_t* pos, uint64_t tag, int depth) noexcept nogil
cdef int entry_cmp(const void* a, const void* b) noexcept nogil
cdef int parse_entries(const uint8_t* p, size_t n, Buf* out) noexcept nogil
cdef int parse_info(const uint8_t* p, size_t n, Info* info, Buf* v4, Buf* v6) noexcept nogil
cdef int add_name(Buf* text, Buf* cands, Str a, Str b, Str c, int dots) noexcept nogil
cdef int entry_names(const uint8_t* wire, Entry* entry, Rules* r, Buf* text,
                     Buf* cands) noexcept nogil
cdef int utf8(const uint8_t* p, size_t n) noexcept nogil
cdef int strings(const uint8_t* p, size_t n, uint8_t last_tag) noexcept nogil
cdef int check(const uint8_t* p, size_t n) noexcept nogil
cdef bytes _encode(bytes dotted)
