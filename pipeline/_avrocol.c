/*
 * pipeline._avrocol: decode a batch of usage_event v1 Avro messages into column buffers.
 *
 * The Python side is pipeline/serde_columnar.py, which turns the buffers returned here into
 * Arrow arrays and documents the semantics. This file knows one writer layout (the 22 fields
 * of schemas/avro/usage_event.v1.avsc, in order); serde_columnar checks that the codec's
 * schema has exactly that layout before using it.
 *
 * Safety rules, because the input is whatever a producer wrote:
 *  - every read is bounds-checked against the message end;
 *  - nothing is allocated from a length read off the wire: strings point into the message,
 *    map entries go into a scratch area that grows only as entries are actually read;
 *  - a row that is not a complete, exact v1 record (bad header, truncated, trailing bytes,
 *    bad UTF-8, bad union index, negative or too-large length, malformed varint, a map key
 *    repeated) is flagged FALLBACK and leaves nothing in the columns but an empty/null slot.
 * No third-party C library: CPython's API and libc only.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ST_OK 0
#define ST_FALLBACK 1

/* ---- SipHash-2-4 (Aumasson & Bernstein), incremental ------------------------------- */

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                           \
    do {                                                                                   \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                          \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                             \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                             \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                          \
    } while (0)

typedef struct {
    uint64_t v0, v1, v2, v3;
    uint64_t tail;  /* pending bytes, little-endian, ntail of them */
    int ntail;
    uint64_t total;
} sip_state;

static inline uint64_t load_le64(const uint8_t *p) {
    return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16) |
           ((uint64_t)p[3] << 24) | ((uint64_t)p[4] << 32) | ((uint64_t)p[5] << 40) |
           ((uint64_t)p[6] << 48) | ((uint64_t)p[7] << 56);
}

static inline void sip_init(sip_state *s, uint64_t k0, uint64_t k1) {
    s->v0 = 0x736f6d6570736575ULL ^ k0;
    s->v1 = 0x646f72616e646f6dULL ^ k1;
    s->v2 = 0x6c7967656e657261ULL ^ k0;
    s->v3 = 0x7465646279746573ULL ^ k1;
    s->tail = 0;
    s->ntail = 0;
    s->total = 0;
}

static inline void sip_word(sip_state *s, uint64_t m) {
    uint64_t v0 = s->v0, v1 = s->v1, v2 = s->v2, v3 = s->v3;
    v3 ^= m;
    SIPROUND;
    SIPROUND;
    v0 ^= m;
    s->v0 = v0; s->v1 = v1; s->v2 = v2; s->v3 = v3;
}

static void sip_update(sip_state *s, const uint8_t *p, size_t n) {
    s->total += n;
    while (s->ntail && n) { /* complete a pending word first */
        s->tail |= (uint64_t)(*p++) << (8 * s->ntail);
        n--;
        if (++s->ntail == 8) {
            sip_word(s, s->tail);
            s->tail = 0;
            s->ntail = 0;
        }
    }
    if (n >= 8) {
        uint64_t v0 = s->v0, v1 = s->v1, v2 = s->v2, v3 = s->v3;
        for (; n >= 8; n -= 8, p += 8) {
            uint64_t m = load_le64(p);
            v3 ^= m;
            SIPROUND;
            SIPROUND;
            v0 ^= m;
        }
        s->v0 = v0; s->v1 = v1; s->v2 = v2; s->v3 = v3;
    }
    while (n) {
        s->tail |= (uint64_t)(*p++) << (8 * s->ntail);
        s->ntail++;
        n--;
    }
}

static uint64_t sip_final(sip_state *s) {
    uint64_t b = (s->total << 56) | s->tail;
    sip_word(s, b);
    uint64_t v0 = s->v0, v1 = s->v1, v2 = s->v2, v3 = s->v3;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static inline uint64_t sip_bytes(uint64_t k0, uint64_t k1, const uint8_t *p, size_t n) {
    sip_state s;
    sip_init(&s, k0, k1);
    sip_update(&s, p, n);
    return sip_final(&s);
}

/* the dedup key's fingerprint: carrier + 0x1f + event_id */
static inline uint64_t key_fingerprint(uint64_t k0, uint64_t k1, const uint8_t *carrier,
                                       size_t ncarrier, const uint8_t *event_id, size_t nid) {
    static const uint8_t sep = 0x1f;
    sip_state s;
    sip_init(&s, k0, k1);
    sip_update(&s, carrier, ncarrier);
    sip_update(&s, &sep, 1);
    sip_update(&s, event_id, nid);
    return sip_final(&s);
}

/* ---- Avro primitives --------------------------------------------------------------- */

/* A zig-zag varint long: at most 10 bytes, and the 10th may only carry bit 63. */
static inline int read_long(const uint8_t **pp, const uint8_t *end, int64_t *out) {
    const uint8_t *p = *pp;
    if (p < end && !(*p & 0x80)) { /* one byte: most token counts and lengths */
        uint64_t v = *p;
        *out = (int64_t)((v >> 1) ^ (~(v & 1) + 1));
        *pp = p + 1;
        return 0;
    }
    uint64_t v = 0;
    int shift = 0;
    for (int i = 0; i < 10; i++) {
        if (p >= end)
            return -1;
        uint8_t b = *p++;
        if (i == 9 && b > 1)
            return -1;
        v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            *out = (int64_t)((v >> 1) ^ (~(v & 1) + 1));
            *pp = p;
            return 0;
        }
        shift += 7;
    }
    return -1;
}

/* Strict UTF-8 as Python decodes it: no overlongs, no surrogates, nothing above U+10FFFF. */
static int utf8_valid(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (!(w & 0x8080808080808080ULL)) {
                i += 8;
                continue;
            }
        }
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
        } else if (c < 0xC2) {
            return 0;
        } else if (c < 0xE0) {
            if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80)
                return 0;
            i += 2;
        } else if (c < 0xF0) {
            if (i + 2 >= n)
                return 0;
            uint8_t c1 = s[i + 1], c2 = s[i + 2];
            if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80)
                return 0;
            if ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 > 0x9F))
                return 0;
            i += 3;
        } else if (c < 0xF5) {
            if (i + 3 >= n)
                return 0;
            uint8_t c1 = s[i + 1], c2 = s[i + 2], c3 = s[i + 3];
            if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80 || (c3 & 0xC0) != 0x80)
                return 0;
            if ((c == 0xF0 && c1 < 0x90) || (c == 0xF4 && c1 > 0x8F))
                return 0;
            i += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

/* An Avro string: length, then that many bytes of valid UTF-8, all inside the message. */
static inline int read_string(const uint8_t **pp, const uint8_t *end, const uint8_t **s,
                              int32_t *len) {
    int64_t n;
    if (read_long(pp, end, &n) < 0 || n < 0 || n > end - *pp || n > INT32_MAX)
        return -1;
    if (!utf8_valid(*pp, (size_t)n))
        return -1;
    *s = *pp;
    *len = (int32_t)n;
    *pp += n;
    return 0;
}

/* ---- the v1 layout ----------------------------------------------------------------- */

enum kind { K_STR, K_LONG, K_OPT_STR, K_OPT_LONG, K_MAP };
#define NFIELDS 22
/* Field kinds in schema order; must match V1_LAYOUT in pipeline/serde.py. */
static const int FIELD_KIND[NFIELDS] = {
    K_STR,      /* event_id */
    K_LONG,     /* event_time */
    K_STR,      /* source */
    K_STR,      /* source_id */
    K_STR,      /* reporting_carrier */
    K_STR,      /* home_carrier */
    K_STR,      /* serving_carrier */
    K_OPT_STR,  /* transaction_id */
    K_STR,      /* tenant_id */
    K_STR,      /* subscriber_id */
    K_STR,      /* channel */
    K_STR,      /* model_id */
    K_STR,      /* provider */
    K_LONG,     /* input_tokens */
    K_LONG,     /* output_tokens */
    K_LONG,     /* cached_tokens */
    K_LONG,     /* reasoning_tokens */
    K_STR,      /* status */
    K_OPT_STR,  /* routing_policy */
    K_OPT_LONG, /* latency_ms */
    K_OPT_STR,  /* region */
    K_MAP,      /* attributes */
};
#define F_EVENT_ID 0
#define F_REPORTING_CARRIER 4

/* A growable byte area owned by C (string data, map entry offsets). ``hint``: the first
 * capacity, an upper bound of the final size when the batch is not huge, so that it is
 * rarely moved; pages never written are never touched (the OS maps them lazily). */
typedef struct {
    uint8_t *data;
    size_t len, cap, hint;
} growbuf;

#define HINT_MAX ((size_t)64 << 20)

static inline int grow_reserve(growbuf *g, size_t extra) {
    if (g->len + extra <= g->cap)
        return 0;
    size_t cap = g->cap ? g->cap : (g->hint > 4096 ? g->hint : 4096);
    while (cap < g->len + extra)
        cap *= 2;
    uint8_t *d = (uint8_t *)realloc(g->data, cap);
    if (!d)
        return -1;
    g->data = d;
    g->cap = cap;
    return 0;
}

typedef struct {
    const uint8_t *k, *v;
    int32_t klen, vlen;
} entry;

/* Map entries of the row being decoded; grows only with entries actually read. */
typedef struct {
    entry *e;
    size_t n, cap;
} entries;

static int entries_push(entries *m, const uint8_t *k, int32_t klen, const uint8_t *v,
                        int32_t vlen) {
    if (m->n == m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 64;
        entry *e = (entry *)realloc(m->e, cap * sizeof(entry));
        if (!e)
            return -1;
        m->e = e;
        m->cap = cap;
    }
    m->e[m->n].k = k;
    m->e[m->n].klen = klen;
    m->e[m->n].v = v;
    m->e[m->n].vlen = vlen;
    m->n++;
    return 0;
}

typedef struct {
    const uint8_t *s[NFIELDS];
    int32_t slen[NFIELDS];
    int64_t lv[NFIELDS];
    int present[NFIELDS];
} row;

#define DECODE_BAD -1
#define DECODE_NOMEM -2

/* An Avro map<string>: blocks of entries up to a zero count. A negative count is
 * followed by the block's size in bytes, which must match what the block holds. */
static int read_map(const uint8_t **pp, const uint8_t *end, entries *m) {
    for (;;) {
        int64_t count, size = -1;
        if (read_long(pp, end, &count) < 0)
            return DECODE_BAD;
        if (count == 0)
            return 0;
        if (count < 0) {
            if (count == INT64_MIN)
                return DECODE_BAD;
            count = -count;
            if (read_long(pp, end, &size) < 0 || size < 0 || size > end - *pp)
                return DECODE_BAD;
        }
        /* every entry takes at least two bytes (two lengths): a bigger count cannot fit */
        if (count > (end - *pp) / 2)
            return DECODE_BAD;
        const uint8_t *block = *pp;
        for (int64_t i = 0; i < count; i++) {
            const uint8_t *k, *v;
            int32_t kl, vl;
            if (read_string(pp, end, &k, &kl) < 0 || read_string(pp, end, &v, &vl) < 0)
                return DECODE_BAD;
            if (entries_push(m, k, kl, v, vl) < 0)
                return DECODE_NOMEM;
        }
        if (size >= 0 && *pp - block != size)
            return DECODE_BAD;
    }
}

/* Open-addressing set of map entry indexes, for the duplicate-key check of big maps. */
typedef struct {
    uint32_t *slots;
    size_t cap;
} keyset;

static inline int same_key(const entry *a, const entry *b) {
    return a->klen == b->klen && memcmp(a->k, b->k, (size_t)a->klen) == 0;
}

/* Whether a key occurs twice: fastavro keeps the last value of a repeated key, so such a
 * map is not what it decodes; the row goes to the scalar path. 1 yes, 0 no, DECODE_NOMEM.
 * Big maps hash the keys with the secret SipHash key, so crafted collisions cannot make
 * the check quadratic. */
static int map_has_duplicates(const entries *m, keyset *ks, uint64_t k0, uint64_t k1) {
    if (m->n < 2)
        return 0;
    if (m->n <= 16) {
        for (size_t i = 1; i < m->n; i++)
            for (size_t j = 0; j < i; j++)
                if (same_key(&m->e[i], &m->e[j]))
                    return 1;
        return 0;
    }
    if (m->n >= UINT32_MAX / 4)
        return 1; /* cannot be a real map; let the scalar path refuse it */
    size_t cap = 64;
    while (cap < 2 * m->n)
        cap *= 2;
    if (ks->cap < cap) {
        uint32_t *slots = (uint32_t *)realloc(ks->slots, cap * sizeof(uint32_t));
        if (!slots)
            return DECODE_NOMEM;
        ks->slots = slots;
        ks->cap = cap;
    }
    memset(ks->slots, 0xff, cap * sizeof(uint32_t));
    size_t mask = cap - 1;
    for (size_t i = 0; i < m->n; i++) {
        size_t h = (size_t)sip_bytes(k0 ^ 0x6d61706b657973ULL, k1, m->e[i].k,
                                     (size_t)m->e[i].klen) & mask;
        while (ks->slots[h] != UINT32_MAX) {
            if (same_key(&m->e[i], &m->e[ks->slots[h]]))
                return 1;
            h = (h + 1) & mask;
        }
        ks->slots[h] = (uint32_t)i;
    }
    return 0;
}

static int decode_body(const uint8_t *p, const uint8_t *end, row *r, entries *m, keyset *ks,
                       uint64_t k0, uint64_t k1) {
    m->n = 0;
    for (int f = 0; f < NFIELDS; f++) {
        int64_t branch;
        switch (FIELD_KIND[f]) {
        case K_STR:
            if (read_string(&p, end, &r->s[f], &r->slen[f]) < 0)
                return DECODE_BAD;
            r->present[f] = 1;
            break;
        case K_LONG:
            if (read_long(&p, end, &r->lv[f]) < 0)
                return DECODE_BAD;
            r->present[f] = 1;
            break;
        case K_OPT_STR:
        case K_OPT_LONG:
            if (read_long(&p, end, &branch) < 0 || (branch != 0 && branch != 1))
                return DECODE_BAD;
            r->present[f] = (int)branch;
            if (!branch) {
                r->slen[f] = 0;
                r->lv[f] = 0;
            } else if (FIELD_KIND[f] == K_OPT_STR) {
                if (read_string(&p, end, &r->s[f], &r->slen[f]) < 0)
                    return DECODE_BAD;
            } else if (read_long(&p, end, &r->lv[f]) < 0) {
                return DECODE_BAD;
            }
            break;
        case K_MAP: {
            int rc = read_map(&p, end, m);
            if (rc < 0)
                return rc;
            rc = map_has_duplicates(m, ks, k0, k1);
            if (rc)
                return rc < 0 ? rc : DECODE_BAD;
            r->present[f] = 1;
            break;
        }
        }
    }
    return p == end ? 0 : DECODE_BAD;
}

/* ---- output columns ---------------------------------------------------------------- */

typedef struct {
    int kind;
    /* fixed-size buffers, allocated as Python bytes before the loop */
    PyObject *offsets_obj, *values_obj, *valid_obj;
    int32_t *offsets;
    int64_t *values;
    uint8_t *valid;
    growbuf data; /* string data */
} column;

typedef struct {
    PyObject *offsets_obj; /* n + 1 int32 entry offsets */
    int32_t *offsets;
    growbuf koff, kdata, voff, vdata; /* keys and items: int32 offsets + bytes */
    int64_t nentries;
} mapcol;

static PyObject *new_bytes(Py_ssize_t n, void **ptr, int zero) {
    PyObject *b = PyBytes_FromStringAndSize(NULL, n);
    if (b) {
        *ptr = PyBytes_AS_STRING(b);
        if (zero)
            memset(*ptr, 0, (size_t)n);
    }
    return b;
}

/* A bytearray of n bytes (the per-row arrays: numpy views of it are writable). */
static PyObject *new_bytearray(Py_ssize_t n, void **ptr) {
    PyObject *b = PyByteArray_FromStringAndSize(NULL, n);
    if (b)
        *ptr = PyByteArray_AS_STRING(b);
    return b;
}

static inline int grow_append(growbuf *g, const void *src, size_t n) {
    if (n == 0) /* an empty string; the buffer may not exist yet (memcpy to NULL is UB) */
        return 0;
    if (grow_reserve(g, n) < 0)
        return -1;
    memcpy(g->data + g->len, src, n);
    g->len += n;
    return 0;
}

/* Whether a decoded row fits the int32 offsets of every column (2 GiB per column). */
static int row_fits(const column *cols, const mapcol *mc, const row *r, const entries *m) {
    for (int f = 0; f < NFIELDS; f++) {
        int k = FIELD_KIND[f];
        if ((k == K_STR || k == K_OPT_STR) &&
            cols[f].data.len + (size_t)r->slen[f] > (size_t)INT32_MAX)
            return 0;
    }
    if ((size_t)mc->nentries + m->n > (size_t)INT32_MAX)
        return 0;
    size_t kl = mc->kdata.len, vl = mc->vdata.len;
    for (size_t i = 0; i < m->n; i++) {
        kl += (size_t)m->e[i].klen;
        vl += (size_t)m->e[i].vlen;
        if (kl > (size_t)INT32_MAX || vl > (size_t)INT32_MAX)
            return 0;
    }
    return 1;
}

/* Write row i (decoded, or an empty/null slot when r is NULL). 0, or -1 out of memory. */
static int emit_row(column *cols, mapcol *mc, Py_ssize_t i, const row *r, const entries *m) {
    for (int f = 0; f < NFIELDS; f++) {
        column *c = &cols[f];
        int k = c->kind;
        if (k == K_STR || k == K_OPT_STR) {
            if (r && r->present[f]) {
                if (grow_append(&c->data, r->s[f], (size_t)r->slen[f]) < 0)
                    return -1;
                if (k == K_OPT_STR)
                    c->valid[i >> 3] |= (uint8_t)(1u << (i & 7));
            }
            c->offsets[i + 1] = (int32_t)c->data.len;
        } else if (k == K_LONG || k == K_OPT_LONG) {
            if (r && r->present[f]) {
                c->values[i] = r->lv[f];
                if (k == K_OPT_LONG)
                    c->valid[i >> 3] |= (uint8_t)(1u << (i & 7));
            } else {
                c->values[i] = 0;
            }
        }
    }
    if (r) {
        if (grow_reserve(&mc->koff, 4 * m->n) < 0 || grow_reserve(&mc->voff, 4 * m->n) < 0)
            return -1;
        for (size_t e = 0; e < m->n; e++) {
            if (grow_append(&mc->kdata, m->e[e].k, (size_t)m->e[e].klen) < 0 ||
                grow_append(&mc->vdata, m->e[e].v, (size_t)m->e[e].vlen) < 0)
                return -1;
            int32_t ko = (int32_t)mc->kdata.len, vo = (int32_t)mc->vdata.len;
            memcpy(mc->koff.data + mc->koff.len, &ko, 4);
            memcpy(mc->voff.data + mc->voff.len, &vo, 4);
            mc->koff.len += 4;
            mc->voff.len += 4;
        }
        mc->nentries += (int64_t)m->n;
    }
    mc->offsets[i + 1] = (int32_t)mc->nentries;
    return 0;
}

static int parse_key(PyObject *key, uint64_t *k0, uint64_t *k1) {
    if (!PyBytes_Check(key) || PyBytes_GET_SIZE(key) != 16) {
        PyErr_SetString(PyExc_ValueError, "hash_key must be 16 bytes");
        return -1;
    }
    const uint8_t *k = (const uint8_t *)PyBytes_AS_STRING(key);
    *k0 = load_le64(k);
    *k1 = load_le64(k + 8);
    return 0;
}

#define CAPSULE_NAME "pipeline._avrocol.buffer"

static void free_capsule(PyObject *capsule) {
    free(PyCapsule_GetPointer(capsule, CAPSULE_NAME));
}

/* Hand a growbuf's memory to Python without copying: (address, size, owner), where owner
 * is a capsule that frees the memory when the last Arrow buffer over it goes. An empty
 * growbuf gives (0, 0, None). */
static PyObject *growbuf_export(growbuf *g) {
    if (!g->len)
        return Py_BuildValue("(nnO)", (Py_ssize_t)0, (Py_ssize_t)0, Py_None);
    uint8_t *shrunk = (uint8_t *)realloc(g->data, g->len); /* give the unused capacity back */
    if (shrunk) {
        g->data = shrunk;
        g->cap = g->len;
    }
    PyObject *capsule = PyCapsule_New(g->data, CAPSULE_NAME, free_capsule);
    if (!capsule)
        return NULL;
    PyObject *out = Py_BuildValue("(KnN)", (unsigned long long)(uintptr_t)g->data,
                                  (Py_ssize_t)g->len, capsule);
    g->data = NULL; /* the capsule owns it now (freed with it if Py_BuildValue failed) */
    g->len = g->cap = 0;
    return out;
}

PyDoc_STRVAR(decode_doc,
"decode(values, fingerprint, confluent_ids, hash_key) -> tuple\n\n"
"Decode a sequence of messages (bytes) written with the usage_event v1 layout.\n"
"fingerprint: the 8-byte single-object fingerprint to accept; confluent_ids: a tuple of\n"
"Confluent schema ids to accept; hash_key: 16 bytes of SipHash-2-4 key.\n"
"Returns (status, payload_hash, key_fp, columns, map) where columns is a tuple of 21\n"
"tuples in schema order (strings: (offsets, data, validity or None); longs: (values,\n"
"validity or None)) and map is (offsets, key_offsets, key_data, item_offsets,\n"
"item_data, entry_count). Buffers are bytes, except string data and the map's key and\n"
"item buffers: (address, size, owner) of memory that owner frees (pa.foreign_buffer).\n"
"Validity bitmaps are Arrow's.");

static PyObject *avrocol_decode(PyObject *self, PyObject *args) {
    PyObject *values, *fp_obj, *ids_obj, *key_obj;
    if (!PyArg_ParseTuple(args, "OSOS", &values, &fp_obj, &ids_obj, &key_obj))
        return NULL;
    if (PyBytes_GET_SIZE(fp_obj) != 8) {
        PyErr_SetString(PyExc_ValueError, "fingerprint must be 8 bytes");
        return NULL;
    }
    uint64_t k0, k1;
    if (parse_key(key_obj, &k0, &k1) < 0)
        return NULL;
    PyObject *ids_t = PySequence_Tuple(ids_obj);
    if (!ids_t)
        return NULL;
    Py_ssize_t nids = PyTuple_GET_SIZE(ids_t);
    uint32_t *ids = (uint32_t *)PyMem_Malloc(sizeof(uint32_t) * (size_t)(nids ? nids : 1));
    if (!ids) {
        Py_DECREF(ids_t);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t j = 0; j < nids; j++) {
        unsigned long v = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(ids_t, j));
        if (PyErr_Occurred() || v > 0xFFFFFFFFUL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a Confluent schema id is 0..2**32-1");
            PyMem_Free(ids);
            Py_DECREF(ids_t);
            return NULL;
        }
        ids[j] = (uint32_t)v;
    }
    Py_DECREF(ids_t);
    uint8_t fp[8];
    memcpy(fp, PyBytes_AS_STRING(fp_obj), 8);

    /* Our own tuple holds every message while the GIL is released. */
    PyObject *msgs = PySequence_Tuple(values);
    if (!msgs) {
        PyMem_Free(ids);
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(msgs);
    const uint8_t **ptrs = (const uint8_t **)PyMem_Malloc(sizeof(uint8_t *) * (size_t)(n + 1));
    Py_ssize_t *lens = (Py_ssize_t *)PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n + 1));
    PyObject *result = NULL;
    PyObject *status_obj = NULL, *ph_obj = NULL, *kf_obj = NULL;
    uint8_t *status = NULL;
    int64_t *phash = NULL;
    uint64_t *kfp = NULL;
    column cols[NFIELDS];
    mapcol mc;
    entries m = {NULL, 0, 0};
    keyset ks = {NULL, 0};
    memset(cols, 0, sizeof(cols));
    memset(&mc, 0, sizeof(mc));
    if (!ptrs || !lens) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyTuple_GET_ITEM(msgs, i);
        if (PyBytes_Check(v)) {
            ptrs[i] = (const uint8_t *)PyBytes_AS_STRING(v);
            lens[i] = PyBytes_GET_SIZE(v);
        } else { /* None or another type: not ours to read, the scalar path decides */
            ptrs[i] = NULL;
            lens[i] = 0;
        }
    }
    /* one column's data never exceeds the batch's bytes: a first capacity that fits */
    size_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        total += (size_t)lens[i];
    size_t hint = total < HINT_MAX ? total : HINT_MAX;
    for (int f = 0; f < NFIELDS; f++)
        cols[f].data.hint = hint;
    mc.kdata.hint = mc.vdata.hint = hint;
    mc.koff.hint = mc.voff.hint = 2 * hint + 4; /* an entry takes 2 bytes or more */
    Py_ssize_t bitmap = (n + 7) / 8;
    if (!(status_obj = new_bytearray(n, (void **)&status)) ||
        !(ph_obj = new_bytearray(8 * n, (void **)&phash)) ||
        !(kf_obj = new_bytearray(8 * n, (void **)&kfp)))
        goto done;
    for (int f = 0; f < NFIELDS; f++) {
        column *c = &cols[f];
        c->kind = FIELD_KIND[f];
        if (c->kind == K_STR || c->kind == K_OPT_STR) {
            if (!(c->offsets_obj = new_bytes(4 * (n + 1), (void **)&c->offsets, 0)))
                goto done;
            c->offsets[0] = 0;
        } else if (c->kind == K_LONG || c->kind == K_OPT_LONG) {
            if (!(c->values_obj = new_bytes(8 * n, (void **)&c->values, 0)))
                goto done;
        }
        if (c->kind == K_OPT_STR || c->kind == K_OPT_LONG) {
            if (!(c->valid_obj = new_bytes(bitmap, (void **)&c->valid, 1)))
                goto done;
        }
    }
    if (!(mc.offsets_obj = new_bytes(4 * (n + 1), (void **)&mc.offsets, 0)))
        goto done;
    mc.offsets[0] = 0;
    {
        int32_t zero = 0;
        if (grow_append(&mc.koff, &zero, 4) < 0 || grow_append(&mc.voff, &zero, 4) < 0) {
            PyErr_NoMemory();
            goto done;
        }
    }

    int nomem = 0;
    Py_BEGIN_ALLOW_THREADS
    row r;
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint8_t *p = ptrs[i], *end = p ? p + lens[i] : NULL, *body = NULL;
        Py_ssize_t len = lens[i];
        if (p && len >= 10 && p[0] == 0xC3 && p[1] == 0x01 && memcmp(p + 2, fp, 8) == 0) {
            body = p + 10;
        } else if (p && len >= 5 && p[0] == 0x00) {
            uint32_t id = ((uint32_t)p[1] << 24) | ((uint32_t)p[2] << 16) |
                          ((uint32_t)p[3] << 8) | (uint32_t)p[4];
            for (Py_ssize_t j = 0; j < nids; j++)
                if (ids[j] == id) {
                    body = p + 5;
                    break;
                }
        }
        int rc = DECODE_BAD;
        if (body) {
            rc = decode_body(body, end, &r, &m, &ks, k0, k1);
            if (rc == 0 && !row_fits(cols, &mc, &r, &m))
                rc = DECODE_BAD;
        }
        if (rc == DECODE_NOMEM || emit_row(cols, &mc, i, rc == 0 ? &r : NULL, &m) < 0) {
            nomem = 1;
            break;
        }
        if (rc == 0) {
            status[i] = ST_OK;
            phash[i] = (int64_t)sip_bytes(k0, k1, body, (size_t)(end - body));
            kfp[i] = key_fingerprint(k0, k1, r.s[F_REPORTING_CARRIER],
                                     (size_t)r.slen[F_REPORTING_CARRIER], r.s[F_EVENT_ID],
                                     (size_t)r.slen[F_EVENT_ID]);
        } else {
            status[i] = ST_FALLBACK;
            phash[i] = 0;
            kfp[i] = 0;
        }
    }
    Py_END_ALLOW_THREADS
    if (nomem) {
        PyErr_NoMemory();
        goto done;
    }

    {
        PyObject *colt = PyTuple_New(NFIELDS - 1);
        if (!colt)
            goto done;
        for (int f = 0; f < NFIELDS - 1; f++) {
            column *c = &cols[f];
            PyObject *item;
            PyObject *valid = c->valid_obj ? c->valid_obj : Py_None;
            if (c->kind == K_STR || c->kind == K_OPT_STR) {
                PyObject *data = growbuf_export(&c->data);
                item = data ? Py_BuildValue("(OOO)", c->offsets_obj, data, valid) : NULL;
                Py_XDECREF(data);
            } else {
                item = Py_BuildValue("(OO)", c->values_obj, valid);
            }
            if (!item) {
                Py_DECREF(colt);
                goto done;
            }
            PyTuple_SET_ITEM(colt, f, item);
        }
        PyObject *ko = growbuf_export(&mc.koff), *kd = growbuf_export(&mc.kdata);
        PyObject *vo = growbuf_export(&mc.voff), *vd = growbuf_export(&mc.vdata);
        PyObject *mapt = NULL;
        if (ko && kd && vo && vd)
            mapt = Py_BuildValue("(OOOOOL)", mc.offsets_obj, ko, kd, vo, vd,
                                 (long long)mc.nentries);
        Py_XDECREF(ko);
        Py_XDECREF(kd);
        Py_XDECREF(vo);
        Py_XDECREF(vd);
        if (mapt)
            result = Py_BuildValue("(OOOOO)", status_obj, ph_obj, kf_obj, colt, mapt);
        Py_DECREF(colt);
        Py_XDECREF(mapt);
    }

done:
    for (int f = 0; f < NFIELDS; f++) {
        Py_XDECREF(cols[f].offsets_obj);
        Py_XDECREF(cols[f].values_obj);
        Py_XDECREF(cols[f].valid_obj);
        free(cols[f].data.data);
    }
    Py_XDECREF(mc.offsets_obj);
    free(mc.koff.data);
    free(mc.kdata.data);
    free(mc.voff.data);
    free(mc.vdata.data);
    free(m.e);
    free(ks.slots);
    Py_XDECREF(status_obj);
    Py_XDECREF(ph_obj);
    Py_XDECREF(kf_obj);
    PyMem_Free(ptrs);
    PyMem_Free(lens);
    PyMem_Free(ids);
    Py_DECREF(msgs);
    return result;
}

/* ---- key fingerprints over Arrow string arrays --------------------------------------- */

typedef struct {
    Py_buffer validity, offsets, data;
    int has_validity;
    Py_ssize_t offset; /* the array's slice offset */
} strarr;

static void strarr_release(strarr *a) {
    if (a->has_validity)
        PyBuffer_Release(&a->validity);
    if (a->offsets.obj)
        PyBuffer_Release(&a->offsets);
    if (a->data.obj)
        PyBuffer_Release(&a->data);
}

/* Borrow the buffers of one Arrow utf8 array, checking that every row is inside them. */
static int strarr_get(PyObject *validity, PyObject *offsets, PyObject *data, Py_ssize_t offset,
                      Py_ssize_t n, strarr *a, const char *name) {
    memset(a, 0, sizeof(*a));
    a->offset = offset;
    if (validity != Py_None) {
        if (PyObject_GetBuffer(validity, &a->validity, PyBUF_SIMPLE) < 0)
            return -1;
        a->has_validity = 1;
        if (a->validity.len * 8 < offset + n)
            goto short_buf;
    }
    if (PyObject_GetBuffer(offsets, &a->offsets, PyBUF_SIMPLE) < 0)
        return -1;
    if (data == Py_None) { /* pyarrow gives no data buffer for an array of empty strings */
        static const char empty = 0;
        PyBuffer_FillInfo(&a->data, NULL, (void *)&empty, 0, 1, PyBUF_SIMPLE);
    } else if (PyObject_GetBuffer(data, &a->data, PyBUF_SIMPLE) < 0) {
        return -1;
    }
    if (a->offsets.len < 4 * (offset + n + 1))
        goto short_buf;
    const int32_t *off = (const int32_t *)a->offsets.buf;
    for (Py_ssize_t i = offset; i < offset + n; i++) {
        int32_t lo, hi;
        memcpy(&lo, off + i, 4);
        memcpy(&hi, off + i + 1, 4);
        if (lo < 0 || hi < lo || hi > a->data.len)
            goto short_buf;
    }
    return 0;
short_buf:
    PyErr_Format(PyExc_ValueError, "%s: Arrow buffers do not hold the array's rows", name);
    return -1;
}

PyDoc_STRVAR(key_fps_doc,
"key_fingerprints(n, carriers, event_ids, hash_key) -> bytearray\n\n"
"carriers and event_ids are (validity or None, offsets, data or None, offset) of Arrow\n"
"utf8 arrays of length n. Returns n uint64 (native order): SipHash-2-4 of\n"
"carrier + b'\\x1f' + event_id, 0 where either is null.");

static PyObject *avrocol_key_fingerprints(PyObject *self, PyObject *args) {
    Py_ssize_t n, coff, eoff;
    PyObject *cv, *co, *cd, *ev, *eo, *ed, *key_obj;
    if (!PyArg_ParseTuple(args, "n(OOOn)(OOOn)O", &n, &cv, &co, &cd, &coff, &ev, &eo, &ed,
                          &eoff, &key_obj))
        return NULL;
    uint64_t k0, k1;
    if (parse_key(key_obj, &k0, &k1) < 0)
        return NULL;
    if (n < 0 || coff < 0 || eoff < 0) {
        PyErr_SetString(PyExc_ValueError, "negative length or offset");
        return NULL;
    }
    strarr c, e;
    if (strarr_get(cv, co, cd, coff, n, &c, "carriers") < 0) {
        strarr_release(&c);
        return NULL;
    }
    if (strarr_get(ev, eo, ed, eoff, n, &e, "event_ids") < 0) {
        strarr_release(&c);
        strarr_release(&e);
        return NULL;
    }
    uint64_t *out;
    PyObject *res = new_bytearray(8 * n, (void **)&out);
    if (res) {
        Py_BEGIN_ALLOW_THREADS
        const int32_t *co32 = (const int32_t *)c.offsets.buf;
        const int32_t *eo32 = (const int32_t *)e.offsets.buf;
        const uint8_t *cvb = c.has_validity ? (const uint8_t *)c.validity.buf : NULL;
        const uint8_t *evb = e.has_validity ? (const uint8_t *)e.validity.buf : NULL;
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t ci = i + coff, ei = i + eoff;
            if ((cvb && !(cvb[ci >> 3] & (1u << (ci & 7)))) ||
                (evb && !(evb[ei >> 3] & (1u << (ei & 7))))) {
                out[i] = 0;
                continue;
            }
            int32_t clo, chi, elo, ehi;
            memcpy(&clo, co32 + ci, 4);
            memcpy(&chi, co32 + ci + 1, 4);
            memcpy(&elo, eo32 + ei, 4);
            memcpy(&ehi, eo32 + ei + 1, 4);
            out[i] = key_fingerprint(k0, k1, (const uint8_t *)c.data.buf + clo,
                                     (size_t)(chi - clo), (const uint8_t *)e.data.buf + elo,
                                     (size_t)(ehi - elo));
        }
        Py_END_ALLOW_THREADS
    }
    strarr_release(&c);
    strarr_release(&e);
    return res;
}

PyDoc_STRVAR(siphash_doc,
"siphash24(hash_key, data) -> int\n\nSipHash-2-4 of data (bytes) as an unsigned 64-bit int.");

static PyObject *avrocol_siphash24(PyObject *self, PyObject *args) {
    PyObject *key_obj;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "Oy*", &key_obj, &data))
        return NULL;
    uint64_t k0, k1;
    if (parse_key(key_obj, &k0, &k1) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    uint64_t h = sip_bytes(k0, k1, (const uint8_t *)data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLongLong(h);
}

static PyMethodDef avrocol_methods[] = {
    {"decode", avrocol_decode, METH_VARARGS, decode_doc},
    {"key_fingerprints", avrocol_key_fingerprints, METH_VARARGS, key_fps_doc},
    {"siphash24", avrocol_siphash24, METH_VARARGS, siphash_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef avrocol_module = {
    PyModuleDef_HEAD_INIT, "_avrocol",
    "Batch decoder of usage_event v1 Avro messages into column buffers (see serde_columnar).",
    -1, avrocol_methods,
};

PyMODINIT_FUNC PyInit__avrocol(void) { return PyModule_Create(&avrocol_module); }
