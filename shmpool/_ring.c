/*
 * shmpool._ring -- layer 0: the per-message mechanics of the SPSC
 * descriptor ring, in C.
 *
 * Owns: `Producer` and `Consumer` (the C halves of shm/ring.py's
 * RingProducer / RingConsumer, which subclass them): descriptor encode /
 * decode, try_push / try_push_many / try_reserve / commit, try_pop /
 * pop_batch / try_peek / release, the wake decision after publishing, and
 * the waiter's two GIL-free halves: `spin` (bounded loads) and
 * `sleep_futex` (announce, re-check, futex wait, clear).
 *
 * Data flow: ring.py calls `bind()` once at import with the Descriptor
 * class and the descriptor's layout as shm/layout.py declares it; the C
 * checks that layout against the offsets it encodes (one place per binary
 * layout: layout.py; a disagreement fails the import). A ring end is
 * constructed over a writable buffer (the segment's memoryview); every call
 * acquires the buffer (PyObject_GetBuffer: the export lasts the call only,
 * so the segment's mmap can always be closed between calls), works on it
 * and releases it.
 *
 * Invariants:
 *  - The same semantics as the reference model shm/ring_model.py, operation
 *    for operation (tests/shm/test_ring_model.py drives both and compares
 *    results, counters and bytes). spec: shm.ring.native
 *  - Every index read from shared memory is validated before use, exactly
 *    as the model does: in [0, size) and only moving forward. A bad one is
 *    a status (RING_CORRUPT) that the method turns into a call of the
 *    Python `self._bad_index(which, value, mine, seen)`, which raises
 *    SegmentCorruptError with the model's message. The C indexes the
 *    descriptor array only with this end's own index, which never leaves
 *    [0, size). spec: shm.guard.validate
 *  - Publishing is a store-release of the index after the entry is written
 *    (producer) or copied out (consumer); then one seq_cst RMW read of the
 *    sleeping-flags word decides the wake: futex_wake here, or a call of
 *    the doorbell's Python `signal()` (the doorbell is a socket).
 *    spec: shm.ordering.ring-publish, shm.wakeup.sleeping-word
 *  - Waiting releases the GIL (spins after the first few loads, and every
 *    futex sleep); EINTR re-takes it, runs PyErr_CheckSignals (a raising
 *    handler aborts the wait, with the sleeping bit cleared) and retries
 *    with the same absolute deadline.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#define RING_HAVE_FUTEX 1
#else
#define RING_HAVE_FUTEX 0
#endif

/* The descriptor as this file encodes it; checked by bind() against
 * shm/layout.py's DESCRIPTOR. */
#define DSIZE 64
#define INLINE_CAP 32
enum { F_MSG = 0, F_FLAGS = 1, F_ID = 4, F_METHOD = 8, F_REF = 16, F_GEN = 20,
       F_POFF = 24, F_PLEN = 28, F_INLINE = 32 };
static const struct { int off; char code; } FIELDS[9] = {
    {F_MSG, 'B'}, {F_FLAGS, 'B'}, {F_ID, 'I'}, {F_METHOD, 'Q'}, {F_REF, 'I'},
    {F_GEN, 'I'}, {F_POFF, 'I'}, {F_PLEN, 'I'}, {F_INLINE, 's'},
};

enum { WAIT_WOKEN = 0, WAIT_VALUE_CHANGED = 1, WAIT_TIMED_OUT = 2, WAIT_NOT_SLEPT = 3 };
enum { RING_OK = 0, RING_CORRUPT = -2 };

static PyTypeObject *desc_type;   /* shm.ring.Descriptor (a tuple subclass) */
static PyObject *struct_error;    /* struct.error: what the model's pack raises */
static uint32_t doorbell_shift;   /* layout.SLEEP_DOORBELL_SHIFT */
static int bound;

#define WORD(base, off) ((_Atomic uint32_t *)((base) + (off)))

static inline void
cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* ------------------------------------------------------------------------ */
/* Descriptor encode / decode                                                */
/* ------------------------------------------------------------------------ */

static int
field_uint(PyObject *o, unsigned long long max, unsigned long long *out)
{
    unsigned long long v;
    if (PyLong_CheckExact(o)) {
        v = PyLong_AsUnsignedLongLong(o);
    } else {
        if (!PyIndex_Check(o)) {
            PyErr_SetString(struct_error, "required argument is not an integer");
            return -1;
        }
        PyObject *n = PyNumber_Index(o);
        if (n == NULL)
            return -1;
        v = PyLong_AsUnsignedLongLong(n);
        Py_DECREF(n);
    }
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        v = max + 1ULL; /* negative or too big: out of range below */
        if (max == UINT64_MAX) {
            PyErr_SetString(struct_error, "argument out of range");
            return -1;
        }
    }
    if (v > max) {
        PyErr_SetString(struct_error, "argument out of range");
        return -1;
    }
    *out = v;
    return 0;
}

static inline void
put_u32(char *p, uint32_t v)
{
    memcpy(p, &v, 4); /* little-endian hosts only: checked at module exec */
}

/* Encode any 9-sequence (a Descriptor, a plain tuple, a list) into `dst`,
 * all or nothing, as struct.pack_into(DESCRIPTOR, ...) would. */
static int
encode(PyObject *desc, char *dst)
{
    PyObject *fast = NULL;
    PyObject **items;
    Py_ssize_t n;
    if (PyTuple_Check(desc)) {
        n = PyTuple_GET_SIZE(desc);
        items = &PyTuple_GET_ITEM(desc, 0);
    } else {
        fast = PySequence_Fast(desc, "a descriptor must be a sequence of 9 fields");
        if (fast == NULL)
            return -1;
        n = PySequence_Fast_GET_SIZE(fast);
        items = PySequence_Fast_ITEMS(fast);
    }
    if (n != 9) {
        PyErr_Format(PyExc_ValueError, "a descriptor has 9 fields, got %zd", n);
        Py_XDECREF(fast);
        return -1;
    }
    unsigned long long v[8];
    static const unsigned long long max[8] = {
        0xFF, 0xFF, 0xFFFFFFFFULL, UINT64_MAX, 0xFFFFFFFFULL, 0xFFFFFFFFULL,
        0xFFFFFFFFULL, 0xFFFFFFFFULL,
    };
    for (int i = 0; i < 8; i++) {
        if (field_uint(items[i], max[i], &v[i]) < 0) {
            Py_XDECREF(fast);
            return -1;
        }
    }
    PyObject *inl = items[8];
    const char *src;
    Py_ssize_t len;
    if (PyBytes_Check(inl)) {
        src = PyBytes_AS_STRING(inl);
        len = PyBytes_GET_SIZE(inl);
    } else if (PyByteArray_Check(inl)) {
        src = PyByteArray_AS_STRING(inl);
        len = PyByteArray_GET_SIZE(inl);
    } else {
        PyErr_SetString(struct_error, "argument for 's' must be a bytes object");
        Py_XDECREF(fast);
        return -1;
    }
    char tmp[DSIZE];
    memset(tmp, 0, sizeof tmp);
    tmp[F_MSG] = (char)(uint8_t)v[0];
    tmp[F_FLAGS] = (char)(uint8_t)v[1];
    put_u32(tmp + F_ID, (uint32_t)v[2]);
    uint64_t method = v[3];
    memcpy(tmp + F_METHOD, &method, 8);
    put_u32(tmp + F_REF, (uint32_t)v[4]);
    put_u32(tmp + F_GEN, (uint32_t)v[5]);
    put_u32(tmp + F_POFF, (uint32_t)v[6]);
    put_u32(tmp + F_PLEN, (uint32_t)v[7]);
    memcpy(tmp + F_INLINE, src, len < INLINE_CAP ? (size_t)len : INLINE_CAP);
    Py_XDECREF(fast);
    memcpy(dst, tmp, DSIZE);
    return 0;
}

/* A new Descriptor (the NamedTuple class bound at import) from 64 bytes. */
static PyObject *
decode(const char *src)
{
    char d[DSIZE];
    memcpy(d, src, DSIZE);
    uint32_t id, ref, gen, poff, plen;
    uint64_t method;
    memcpy(&id, d + F_ID, 4);
    memcpy(&method, d + F_METHOD, 8);
    memcpy(&ref, d + F_REF, 4);
    memcpy(&gen, d + F_GEN, 4);
    memcpy(&poff, d + F_POFF, 4);
    memcpy(&plen, d + F_PLEN, 4);
    PyObject *t = desc_type->tp_alloc(desc_type, 9);
    if (t == NULL)
        return NULL;
    PyObject *f[9] = {
        PyLong_FromLong((uint8_t)d[F_MSG]),
        PyLong_FromLong((uint8_t)d[F_FLAGS]),
        PyLong_FromUnsignedLong(id),
        PyLong_FromUnsignedLongLong(method),
        PyLong_FromUnsignedLong(ref),
        PyLong_FromUnsignedLong(gen),
        PyLong_FromUnsignedLong(poff),
        PyLong_FromUnsignedLong(plen),
        PyBytes_FromStringAndSize(d + F_INLINE, INLINE_CAP),
    };
    int bad = 0;
    for (int i = 0; i < 9; i++) {
        if (f[i] == NULL)
            bad = 1;
        PyTuple_SET_ITEM(t, i, f[i]);
    }
    if (bad) {
        Py_DECREF(t);
        return NULL;
    }
    return t;
}

/* ------------------------------------------------------------------------ */
/* Ring ends                                                                 */
/* ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *buf;
    PyObject *doorbell;   /* a Doorbell or None */
    PyObject *name;
    Py_ssize_t need;      /* bytes the buffer must have */
    Py_ssize_t desc_off, head_off, tail_off, flags_off;
    uint32_t size, mask;
    uint32_t wake_bit, wake_mask;
    uint32_t mine;        /* producer: head; consumer: tail (this end writes it) */
    uint32_t seen;        /* the other end's index, as last validated */
    unsigned long long transfers, would_block, wakes_sent;
    int consumer;
    int ready;
} Ring;

static PyTypeObject ProducerType;
static PyTypeObject ConsumerType;

/* The buffer for one call. Its pointer may differ between calls (a resized
 * bytearray): length and alignment are re-checked, a compare each. */
static char *
acquire(Ring *r, Py_buffer *v)
{
    if (!r->ready) {
        PyErr_SetString(PyExc_RuntimeError, "ring end used before __init__");
        return NULL;
    }
    if (PyObject_GetBuffer(r->buf, v, PyBUF_WRITABLE) < 0)
        return NULL;
    char *base = v->buf;
    if (v->len < r->need ||
        ((uintptr_t)(base + r->head_off) | (uintptr_t)(base + r->tail_off) |
         (uintptr_t)(base + r->flags_off)) & 3) {
        PyBuffer_Release(v);
        PyErr_SetString(PyExc_ValueError, "the ring's buffer no longer holds its ring");
        return NULL;
    }
    return base;
}

/* Turn RING_CORRUPT into the model's SegmentCorruptError: ring.py's
 * `_bad_index` composes the message and raises. */
static PyObject *
bad_index(Ring *r, const char *which, uint32_t value, uint32_t mine, uint32_t seen)
{
    PyObject *res = PyObject_CallMethod((PyObject *)r, "_bad_index", "sIII",
                                        which, value, mine, seen);
    if (res != NULL) {
        Py_DECREF(res);
        PyErr_Format(PyExc_RuntimeError, "_bad_index returned for %s index %u", which, value);
    }
    return NULL;
}

static int
futex_wake1(_Atomic uint32_t *word)
{
#if RING_HAVE_FUTEX
    if (syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, 1, NULL, NULL, 0) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
#endif
    return 0;
}

/* After publishing the index at `word_off`: wake the other end if it
 * announced sleep. spec: shm.wakeup.sleeping-word */
static int
wake_other(Ring *r, char *base, Py_ssize_t word_off)
{
    uint32_t flags = atomic_fetch_or_explicit(WORD(base, r->flags_off), 0, memory_order_seq_cst);
    if (!(flags & r->wake_mask))
        return 0;
    r->wakes_sent++;
    if ((flags & r->wake_bit) && futex_wake1(WORD(base, word_off)) < 0)
        return -1;
    if (r->doorbell != Py_None && (flags & (r->wake_bit << doorbell_shift))) {
        PyObject *res = PyObject_CallMethod(r->doorbell, "signal", NULL);
        if (res == NULL)
            return -1;
        Py_DECREF(res);
    }
    return 0;
}

static int
ring_traverse(Ring *r, visitproc visit, void *arg)
{
    Py_VISIT(r->buf);
    Py_VISIT(r->doorbell);
    Py_VISIT(r->name);
    return 0;
}

static int
ring_clear(Ring *r)
{
    r->ready = 0;
    Py_CLEAR(r->buf);
    Py_CLEAR(r->doorbell);
    Py_CLEAR(r->name);
    return 0;
}

/* (Static types: a heap subclass's own dealloc and traverse handle the
 * reference to its type.) */
static void
ring_dealloc(Ring *r)
{
    PyObject_GC_UnTrack(r);
    ring_clear(r);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static int
word_ok(const char *what, Py_ssize_t off, Py_buffer *v)
{
    if (off < 0 || off > v->len - 4 || ((uintptr_t)((char *)v->buf + off)) & 3) {
        PyErr_Format(PyExc_ValueError, "%s word at %zd is not an aligned 32-bit word "
                     "of the %zd-byte buffer", what, off, v->len);
        return 0;
    }
    return 1;
}

/* Ring(buf, desc_offset, size, head_off, tail_off, flags_off, wake_bit,
 *      doorbell, name) */
static int
ring_init(Ring *r, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"buf", "desc_offset", "size", "head_off", "tail_off",
                             "flags_off", "wake_bit", "doorbell", "name", NULL};
    PyObject *buf, *doorbell, *name;
    Py_ssize_t desc_off, size, head_off, tail_off, flags_off;
    unsigned int wake_bit;
    if (!bound) {
        PyErr_SetString(PyExc_RuntimeError, "shmpool._ring.bind() was not called");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OnnnnnIOU", kwlist, &buf, &desc_off, &size,
                                     &head_off, &tail_off, &flags_off, &wake_bit, &doorbell,
                                     &name))
        return -1;
    if (size < 2 || size > (Py_ssize_t)1 << 30 || (size & (size - 1))) {
        PyErr_Format(PyExc_ValueError, "ring size must be a power of two >= 2, got %zd", size);
        return -1;
    }
    if (wake_bit == 0 || (wake_bit & (wake_bit - 1)) || (wake_bit << doorbell_shift) == 0) {
        PyErr_Format(PyExc_ValueError, "wake_bit must be one bit below the doorbell bits, got %u",
                     wake_bit);
        return -1;
    }
    Py_buffer v;
    if (PyObject_GetBuffer(buf, &v, PyBUF_WRITABLE) < 0) {
        if (PyErr_ExceptionMatches(PyExc_BufferError) || PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "expected a writable contiguous buffer, got %.100s",
                         Py_TYPE(buf)->tp_name);
        }
        return -1;
    }
    if (desc_off < 0 || desc_off > v.len || size * DSIZE > v.len - desc_off ||
        desc_off % DSIZE) {
        PyErr_Format(PyExc_ValueError, "descriptor array at %zd does not fit the buffer", desc_off);
        PyBuffer_Release(&v);
        return -1;
    }
    if (!word_ok("head", head_off, &v) || !word_ok("tail", tail_off, &v) ||
        !word_ok("flags", flags_off, &v)) {
        PyBuffer_Release(&v);
        return -1;
    }
    Py_ssize_t need = desc_off + size * DSIZE;
    Py_ssize_t words[3] = {head_off, tail_off, flags_off};
    for (int i = 0; i < 3; i++)
        if (words[i] + 4 > need)
            need = words[i] + 4;
    char *base = v.buf;
    uint32_t head = atomic_load_explicit(WORD(base, head_off), memory_order_acquire);
    uint32_t tail = atomic_load_explicit(WORD(base, tail_off), memory_order_acquire);
    PyBuffer_Release(&v);

    Py_INCREF(buf);
    Py_XSETREF(r->buf, buf);
    Py_INCREF(doorbell);
    Py_XSETREF(r->doorbell, doorbell);
    Py_INCREF(name);
    Py_XSETREF(r->name, name);
    r->need = need;
    r->desc_off = desc_off;
    r->head_off = head_off;
    r->tail_off = tail_off;
    r->flags_off = flags_off;
    r->size = (uint32_t)size;
    r->mask = (uint32_t)size - 1;
    r->wake_bit = wake_bit;
    r->wake_mask = wake_bit | (wake_bit << doorbell_shift);
    r->transfers = r->would_block = r->wakes_sent = 0;
    r->consumer = PyObject_TypeCheck(r, &ConsumerType);
    r->ready = 0;
    /* A corrupt index would make this end write outside the ring. */
    if (head >= r->size) {
        bad_index(r, "head", head, 0, 0);
        return -1;
    }
    if (tail >= r->size) {
        bad_index(r, "tail", tail, 0, 0);
        return -1;
    }
    r->mine = r->consumer ? tail : head;
    r->seen = r->consumer ? head : tail;
    r->ready = 1;
    return 0;
}

static PyObject *
ring_depth(Ring *r, PyObject *unused)
{
    Py_buffer v;
    char *base = acquire(r, &v);
    if (base == NULL)
        return NULL;
    uint32_t h = atomic_load_explicit(WORD(base, r->head_off), memory_order_acquire);
    uint32_t t = atomic_load_explicit(WORD(base, r->tail_off), memory_order_acquire);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLong((h - t) & r->mask);
}

/* -- producer ------------------------------------------------------------ */

/* Load the consumer's tail and validate it: in range, and the entries in
 * flight ((head - tail) mod size) did not grow. */
static int
reload_tail(Ring *r, char *base, uint32_t head, uint32_t *bad)
{
    uint32_t t = atomic_load_explicit(WORD(base, r->tail_off), memory_order_acquire);
    if (t > r->mask || ((head - t) & r->mask) > ((head - r->seen) & r->mask)) {
        *bad = t;
        return RING_CORRUPT;
    }
    r->seen = t;
    return RING_OK;
}

/* Room for one more entry at `head`? 1 yes, 0 full, RING_CORRUPT. */
static int
room_for_one(Ring *r, char *base, uint32_t head, uint32_t *bad)
{
    uint32_t nxt = (head + 1) & r->mask;
    if (nxt != r->seen)
        return 1;
    if (reload_tail(r, base, head, bad) < 0)
        return RING_CORRUPT;
    return r->seen != nxt;
}

static PyObject *
publish_head(Ring *r, char *base, Py_buffer *v, uint32_t head, unsigned long long n, PyObject *ret)
{
    /* spec: shm.ordering.ring-publish */
    atomic_store_explicit(WORD(base, r->head_off), head, memory_order_release);
    r->mine = head;
    r->transfers += n;
    int rc = wake_other(r, base, r->head_off);
    PyBuffer_Release(v);
    if (rc < 0) {
        Py_XDECREF(ret);
        return NULL;
    }
    return ret;
}

static PyObject *
producer_try_push(Ring *r, PyObject *desc)
{
    Py_buffer v;
    uint32_t bad;
    char *base = acquire(r, &v);
    if (base == NULL)
        return NULL;
    uint32_t head = r->mine, seen = r->seen;
    int room = room_for_one(r, base, head, &bad);
    if (room <= 0) {
        PyBuffer_Release(&v);
        if (room == RING_CORRUPT)
            return bad_index(r, "tail", bad, head, seen);
        r->would_block++;
        Py_RETURN_FALSE;
    }
    if (encode(desc, base + r->desc_off + (Py_ssize_t)head * DSIZE) < 0) {
        PyBuffer_Release(&v);
        return NULL;
    }
    return publish_head(r, base, &v, (head + 1) & r->mask, 1, Py_NewRef(Py_True));
}

static PyObject *
producer_try_push_many(Ring *r, PyObject *descs)
{
    Py_buffer v;
    uint32_t bad;
    char *base = acquire(r, &v);
    if (base == NULL)
        return NULL;
    uint32_t start = r->mine, head = start, seen = r->seen;
    if (reload_tail(r, base, head, &bad) < 0) {
        PyBuffer_Release(&v);
        return bad_index(r, "tail", bad, head, seen);
    }
    uint32_t room = (r->seen - head - 1) & r->mask;
    PyObject *it = PyObject_GetIter(descs);
    if (it == NULL) {
        PyBuffer_Release(&v);
        return NULL;
    }
    uint32_t n = 0;
    while (n < room) {
        PyObject *d = PyIter_Next(it);
        if (d == NULL) {
            if (PyErr_Occurred())
                goto fail;
            break;
        }
        int rc = encode(d, base + r->desc_off + (Py_ssize_t)head * DSIZE);
        Py_DECREF(d);
        if (rc < 0)
            goto fail;
        head = (head + 1) & r->mask;
        n++;
    }
    Py_DECREF(it);
    if (n == room)
        r->would_block++;
    if (head == start) {
        PyBuffer_Release(&v);
        return PyLong_FromUnsignedLong(n);
    }
    return publish_head(r, base, &v, head, n, PyLong_FromUnsignedLong(n));
fail:
    Py_DECREF(it);
    PyBuffer_Release(&v);
    return NULL;
}

static PyObject *
producer_try_reserve(Ring *r, PyObject *unused)
{
    Py_buffer v;
    uint32_t bad;
    char *base = acquire(r, &v);
    if (base == NULL)
        return NULL;
    uint32_t head = r->mine, seen = r->seen;
    int room = room_for_one(r, base, head, &bad);
    PyBuffer_Release(&v);
    if (room == RING_CORRUPT)
        return bad_index(r, "tail", bad, head, seen);
    if (room == 0) {
        r->would_block++;
        Py_RETURN_NONE;
    }
    return PyLong_FromSsize_t(r->desc_off + (Py_ssize_t)head * DSIZE);
}

static PyObject *
producer_commit(Ring *r, PyObject *unused)
{
    Py_buffer v;
    char *base = acquire(r, &v);
    if (base == NULL)
        return NULL;
    return publish_head(r, base, &v, (r->mine + 1) & r->mask, 1, Py_NewRef(Py_None));
}

/* -- consumer ------------------------------------------------------------ */

/* An entry at `tail`? 1 yes, 0 empty, RING_CORRUPT. The head is reloaded
 * only when the cached one says empty; for an empty ring any in-range head
 * is a forward move. spec: shm.ordering.ring-consume */
static int
entry_at(Ring *r, char *base, uint32_t tail, uint32_t *bad)
{
    if (tail != r->seen)
        return 1;
    uint32_t h = atomic_load_explicit(WORD(base, r->head_off), memory_order_acquire);
    if (h == tail)
        return 0;
    if (h > r->mask) {
        *bad = h;
        return RING_CORRUPT;
    }
    r->seen = h;
    return 1;
}

static PyObject *
publish_tail(Ring *r, char *base, Py_buffer *v, uint32_t tail, unsigned long long n, PyObject *ret)
{
    atomic_store_explicit(WORD(base, r->tail_off), tail, memory_order_release);
    r->mine = tail;
    r->transfers += n;
    int rc = wake_other(r, base, r->tail_off);
    PyBuffer_Release(v);
    if (rc < 0) {
        Py_XDECREF(ret);
        return NULL;
    }
    return ret;
}

static PyObject *
consumer_try_pop(Ring *r, PyObject *unused)
{
    Py_buffer v;
    uint32_t bad;
    char *base = acquire(r, &v);
    if (base == NULL)
        return NULL;
    uint32_t tail = r->mine;
    int has = entry_at(r, base, tail, &bad);
    if (has <= 0) {
        PyBuffer_Release(&v);
        if (has == RING_CORRUPT)
            return bad_index(r, "head", bad, tail, tail);
        r->would_block++;
        Py_RETURN_NONE;
    }
    PyObject *d = decode(base + r->desc_off + (Py_ssize_t)tail * DSIZE);
    if (d == NULL) {
        PyBuffer_Release(&v);
        return NULL;
    }
    /* the copy is done: release the entry */
    return publish_tail(r, base, &v, (tail + 1) & r->mask, 1, d);
}

static PyObject *
consumer_try_peek(Ring *r, PyObject *unused)
{
    Py_buffer v;
    uint32_t bad;
    char *base = acquire(r, &v);
    if (base == NULL)
        return NULL;
    uint32_t tail = r->mine;
    int has = entry_at(r, base, tail, &bad);
    PyBuffer_Release(&v);
    if (has == RING_CORRUPT)
        return bad_index(r, "head", bad, tail, tail);
    if (has == 0) {
        r->would_block++;
        Py_RETURN_NONE;
    }
    return PyLong_FromSsize_t(r->desc_off + (Py_ssize_t)tail * DSIZE);
}

static PyObject *
consumer_release(Ring *r, PyObject *unused)
{
    Py_buffer v;
    char *base = acquire(r, &v);
    if (base == NULL)
        return NULL;
    return publish_tail(r, base, &v, (r->mine + 1) & r->mask, 1, Py_NewRef(Py_None));
}

static PyObject *
consumer_pop_batch(Ring *r, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t max_n = 64;
    if (nargs > 1) {
        PyErr_Format(PyExc_TypeError, "pop_batch() takes at most 1 argument (%zd given)", nargs);
        return NULL;
    }
    if (nargs == 1) {
        max_n = PyNumber_AsSsize_t(args[0], PyExc_OverflowError);
        if (max_n == -1 && PyErr_Occurred())
            return NULL;
    }
    Py_buffer v;
    char *base = acquire(r, &v);
    if (base == NULL)
        return NULL;
    uint32_t tail = r->mine, mask = r->mask, seen = r->seen;
    uint32_t head = atomic_load_explicit(WORD(base, r->head_off), memory_order_acquire);
    if (head > mask || ((head - tail) & mask) < ((seen - tail) & mask)) {
        PyBuffer_Release(&v);
        return bad_index(r, "head", head, tail, seen);
    }
    r->seen = head;
    Py_ssize_t n = (head - tail) & mask;
    if (max_n < n)
        n = max_n < 0 ? 0 : max_n;
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        PyBuffer_Release(&v);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *d = decode(base + r->desc_off + (Py_ssize_t)((tail + i) & mask) * DSIZE);
        if (d == NULL) {
            Py_DECREF(out);
            PyBuffer_Release(&v);
            return NULL;
        }
        PyList_SET_ITEM(out, i, d);
    }
    if (n == 0) {
        r->would_block++;
        PyBuffer_Release(&v);
        return out;
    }
    return publish_tail(r, base, &v, (tail + (uint32_t)n) & mask, (unsigned long long)n, out);
}

static PyObject *
consumer_tail(Ring *r, void *unused)
{
    return PyLong_FromUnsignedLong(r->mine);
}

/* -- types ---------------------------------------------------------------- */

#define COMMON_MEMBERS                                                                    \
    {"buf", T_OBJECT, offsetof(Ring, buf), READONLY, "the buffer the ring lives in"},    \
    {"doorbell", T_OBJECT, offsetof(Ring, doorbell), READONLY, "the doorbell, or None"}, \
    {"name", T_OBJECT, offsetof(Ring, name), READONLY, NULL},                            \
    {"size", T_UINT, offsetof(Ring, size), READONLY, "entries (a power of two)"},        \
    {"mask", T_UINT, offsetof(Ring, mask), READONLY, NULL},                              \
    {"desc_off", T_PYSSIZET, offsetof(Ring, desc_off), READONLY, NULL},                  \
    {"head_off", T_PYSSIZET, offsetof(Ring, head_off), READONLY, NULL},                  \
    {"tail_off", T_PYSSIZET, offsetof(Ring, tail_off), READONLY, NULL},                  \
    {"flags_off", T_PYSSIZET, offsetof(Ring, flags_off), READONLY, NULL},                \
    {"_wake_bit", T_UINT, offsetof(Ring, wake_bit), READONLY, NULL},                     \
    {"_wake_mask", T_UINT, offsetof(Ring, wake_mask), READONLY, NULL},                   \
    {"transfers", T_ULONGLONG, offsetof(Ring, transfers), 0, NULL},                      \
    {"would_block", T_ULONGLONG, offsetof(Ring, would_block), 0, NULL},                  \
    {"wakes_sent", T_ULONGLONG, offsetof(Ring, wakes_sent), 0, NULL}

static PyMemberDef producer_members[] = {
    COMMON_MEMBERS,
    {"_head", T_UINT, offsetof(Ring, mine), READONLY, "this end's head"},
    {"_tail_seen", T_UINT, offsetof(Ring, seen), READONLY, "the tail last validated"},
    {NULL},
};

static PyMemberDef consumer_members[] = {
    COMMON_MEMBERS,
    {"_tail", T_UINT, offsetof(Ring, mine), READONLY, "this end's tail"},
    {"_head_seen", T_UINT, offsetof(Ring, seen), READONLY, "the head last validated"},
    {NULL},
};

static PyGetSetDef consumer_getset[] = {
    {"tail", (getter)consumer_tail, NULL,
     "the index of the next entry this end will pop (its copy of the tail word)", NULL},
    {NULL},
};

static PyMethodDef producer_methods[] = {
    {"try_push", (PyCFunction)producer_try_push, METH_O,
     "try_push(desc) -> bool: push one descriptor (any 9-sequence); False if full."},
    {"try_push_many", (PyCFunction)producer_try_push_many, METH_O,
     "try_push_many(descs) -> int: push a prefix of descs that fits, publishing head once."},
    {"try_reserve", (PyCFunction)producer_try_reserve, METH_NOARGS,
     "try_reserve() -> int | None: offset of the entry to fill, None if full."},
    {"commit", (PyCFunction)producer_commit, METH_NOARGS,
     "commit(): publish the entry filled after try_reserve()."},
    {"depth", (PyCFunction)ring_depth, METH_NOARGS, "depth() -> int: entries in the ring."},
    {NULL},
};

static PyMethodDef consumer_methods[] = {
    {"try_pop", (PyCFunction)consumer_try_pop, METH_NOARGS,
     "try_pop() -> Descriptor | None"},
    {"pop_batch", (PyCFunction)(void (*)(void))consumer_pop_batch, METH_FASTCALL,
     "pop_batch(max_n=64) -> list[Descriptor]: pop up to max_n, publishing tail once."},
    {"try_peek", (PyCFunction)consumer_try_peek, METH_NOARGS,
     "try_peek() -> int | None: offset of the next entry, None if empty."},
    {"release", (PyCFunction)consumer_release, METH_NOARGS,
     "release(): hand the peeked entry back to the producer."},
    {"depth", (PyCFunction)ring_depth, METH_NOARGS, "depth() -> int: entries in the ring."},
    {NULL},
};

static PyTypeObject ProducerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmpool._ring.Producer",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The producing end of an SPSC descriptor ring (C half).",
    .tp_traverse = (traverseproc)ring_traverse,
    .tp_clear = (inquiry)ring_clear,
    .tp_dealloc = (destructor)ring_dealloc,
    .tp_init = (initproc)ring_init,
    .tp_new = PyType_GenericNew,
    .tp_methods = producer_methods,
    .tp_members = producer_members,
};

static PyTypeObject ConsumerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmpool._ring.Consumer",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The consuming end of an SPSC descriptor ring (C half).",
    .tp_traverse = (traverseproc)ring_traverse,
    .tp_clear = (inquiry)ring_clear,
    .tp_dealloc = (destructor)ring_dealloc,
    .tp_init = (initproc)ring_init,
    .tp_new = PyType_GenericNew,
    .tp_methods = consumer_methods,
    .tp_members = consumer_members,
    .tp_getset = consumer_getset,
};

/* ------------------------------------------------------------------------ */
/* The waiter's GIL-free halves                                              */
/* ------------------------------------------------------------------------ */

static int
word_arg(PyObject *buf, PyObject *off_obj, Py_buffer *v, _Atomic uint32_t **out)
{
    if (PyObject_GetBuffer(buf, v, PyBUF_WRITABLE) < 0)
        return -1;
    Py_ssize_t off = PyNumber_AsSsize_t(off_obj, NULL);
    if (off == -1 && PyErr_Occurred()) {
        PyBuffer_Release(v);
        return -1;
    }
    if (!word_ok("the", off, v)) {
        PyBuffer_Release(v);
        return -1;
    }
    *out = WORD((char *)v->buf, off);
    return 0;
}

static int
u32_of(PyObject *o, uint32_t *out)
{
    unsigned long long v;
    PyObject *n = PyNumber_Index(o);
    if (n == NULL)
        return -1;
    v = PyLong_AsUnsignedLongLong(n);
    Py_DECREF(n);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (v > 0xFFFFFFFFULL) {
        PyErr_SetString(PyExc_OverflowError, "value must be in range [0, 2**32)");
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

/* spin(buf, off, observed, loads) -> bool: load the word (acquire) up to
 * `loads` times until it differs from `observed`. The first 32 loads keep
 * the GIL (most hits come early and a GIL hand-off costs more than they
 * do); the rest run with it released. spec: shm.wakeup.spin */
static PyObject *
ring_spin(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "spin(buf, off, observed, loads)");
        return NULL;
    }
    uint32_t observed;
    if (u32_of(args[2], &observed) < 0)
        return NULL;
    Py_ssize_t loads = PyNumber_AsSsize_t(args[3], PyExc_OverflowError);
    if (loads == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer v;
    _Atomic uint32_t *p;
    if (word_arg(args[0], args[1], &v, &p) < 0)
        return NULL;
    int changed = 0;
    Py_ssize_t i = 0;
    for (; i < loads && i < 32; i++) {
        if (atomic_load_explicit(p, memory_order_acquire) != observed) {
            changed = 1;
            break;
        }
    }
    if (!changed && i < loads) {
        Py_BEGIN_ALLOW_THREADS
        for (; i < loads; i++) {
            if (atomic_load_explicit(p, memory_order_acquire) != observed) {
                changed = 1;
                break;
            }
            cpu_relax();
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&v);
    return PyBool_FromLong(changed);
}

/* sleep_futex(buf, flags_off, bit, off, observed, timeout) -> int: one
 * futex sleep of the sleeping-word protocol. Announce (`bit` ORed into the
 * flags word, seq_cst), re-check the word, sleep while it equals
 * `observed` at most `timeout` seconds with the GIL released, clear the
 * bit. Returns NOT_SLEPT (the re-check saw a change), WOKEN, VALUE_CHANGED
 * or TIMED_OUT. spec: shm.wakeup.sleeping-word */
static PyObject *
ring_sleep_futex(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "sleep_futex(buf, flags_off, bit, off, observed, timeout)");
        return NULL;
    }
    uint32_t bit, observed;
    if (u32_of(args[2], &bit) < 0 || u32_of(args[4], &observed) < 0)
        return NULL;
    double t = PyFloat_AsDouble(args[5]);
    if (t == -1.0 && PyErr_Occurred())
        return NULL;
    if (!(t >= 0.0) || t > 1e9) {
        PyErr_SetString(PyExc_ValueError, "timeout must be a number of seconds in [0, 1e9]");
        return NULL;
    }
    Py_buffer fv, wv;
    _Atomic uint32_t *flags, *word;
    if (word_arg(args[0], args[1], &fv, &flags) < 0)
        return NULL;
    if (word_arg(args[0], args[3], &wv, &word) < 0) {
        PyBuffer_Release(&fv);
        return NULL;
    }
#if RING_HAVE_FUTEX
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    double whole = (double)(time_t)t;
    deadline.tv_sec += (time_t)t;
    deadline.tv_nsec += (long)((t - whole) * 1e9);
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec += 1;
        deadline.tv_nsec -= 1000000000L;
    }
    int status = WAIT_NOT_SLEPT;
    PyObject *ret = NULL;
    atomic_fetch_or_explicit(flags, bit, memory_order_seq_cst);
    if (atomic_load_explicit(word, memory_order_acquire) == observed) {
        for (;;) {
            long rc;
            int err;
            Py_BEGIN_ALLOW_THREADS
            rc = syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_BITSET, observed, &deadline,
                         NULL, FUTEX_BITSET_MATCH_ANY);
            err = errno;
            Py_END_ALLOW_THREADS
            if (rc == 0) {
                status = WAIT_WOKEN;
                break;
            }
            if (err == EAGAIN) {
                status = WAIT_VALUE_CHANGED;
                break;
            }
            if (err == ETIMEDOUT) {
                status = WAIT_TIMED_OUT;
                break;
            }
            if (err == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    goto out; /* a raising handler aborts the wait */
                continue;
            }
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            goto out;
        }
    }
    ret = PyLong_FromLong(status);
out:
    atomic_fetch_and_explicit(flags, ~bit, memory_order_seq_cst);
    PyBuffer_Release(&wv);
    PyBuffer_Release(&fv);
    return ret;
#else
    PyBuffer_Release(&wv);
    PyBuffer_Release(&fv);
    PyErr_SetString(PyExc_NotImplementedError, "futex is Linux-only; use SHMPOOL_WAIT=poll");
    return NULL;
#endif
}

/* bind(descriptor_type, struct_error, size, fields, doorbell_shift): called
 * once by shm/ring.py at import. `fields` is ((offset, code), ...) of the
 * nine descriptor fields as shm/layout.py's DESCRIPTOR declares them; any
 * difference from what this file encodes fails the import. */
static PyObject *
ring_bind(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "bind(descriptor_type, struct_error, size, fields, doorbell_shift)");
        return NULL;
    }
    PyObject *tp = args[0], *err = args[1];
    if (!PyType_Check(tp) || !PyType_IsSubtype((PyTypeObject *)tp, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "descriptor_type must be a tuple subclass");
        return NULL;
    }
    if (!PyExceptionClass_Check(err)) {
        PyErr_SetString(PyExc_TypeError, "struct_error must be an exception class");
        return NULL;
    }
    Py_ssize_t size = PyNumber_AsSsize_t(args[2], PyExc_OverflowError);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    long shift = PyLong_AsLong(args[4]);
    if (shift == -1 && PyErr_Occurred())
        return NULL;
    if (size != DSIZE) {
        PyErr_Format(PyExc_ImportError, "descriptor is %zd bytes in layout.py, %d in _ring.c",
                     size, DSIZE);
        return NULL;
    }
    if (shift < 1 || shift > 16) {
        PyErr_Format(PyExc_ImportError, "doorbell shift %ld out of range", shift);
        return NULL;
    }
    PyObject *fields = PySequence_Tuple(args[3]);
    if (fields == NULL)
        return NULL;
    if (PyTuple_GET_SIZE(fields) != 9) {
        Py_DECREF(fields);
        PyErr_SetString(PyExc_ImportError, "descriptor must have 9 fields");
        return NULL;
    }
    for (int i = 0; i < 9; i++) {
        int off;
        const char *code;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(fields, i), "is", &off, &code)) {
            Py_DECREF(fields);
            return NULL;
        }
        if (off != FIELDS[i].off || code[0] != FIELDS[i].code || code[1] != '\0') {
            PyErr_Format(PyExc_ImportError, "descriptor field %d is (%d, %s) in layout.py, "
                         "(%d, %c) in _ring.c", i, off, code, FIELDS[i].off, FIELDS[i].code);
            Py_DECREF(fields);
            return NULL;
        }
    }
    Py_DECREF(fields);
    Py_INCREF(tp);
    Py_XSETREF(desc_type, (PyTypeObject *)tp);
    Py_INCREF(err);
    Py_XSETREF(struct_error, err);
    doorbell_shift = (uint32_t)shift;
    bound = 1;
    Py_RETURN_NONE;
}

static PyObject *
ring_encode(PyObject *m, PyObject *desc)
{
    if (!bound) {
        PyErr_SetString(PyExc_RuntimeError, "shmpool._ring.bind() was not called");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, DSIZE);
    if (out == NULL)
        return NULL;
    if (encode(desc, PyBytes_AS_STRING(out)) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *
ring_decode(PyObject *m, PyObject *data)
{
    if (!bound) {
        PyErr_SetString(PyExc_RuntimeError, "shmpool._ring.bind() was not called");
        return NULL;
    }
    Py_buffer v;
    if (PyObject_GetBuffer(data, &v, PyBUF_SIMPLE) < 0)
        return NULL;
    if (v.len != DSIZE) {
        PyBuffer_Release(&v);
        PyErr_Format(PyExc_ValueError, "a descriptor is %d bytes, got %zd", DSIZE, v.len);
        return NULL;
    }
    PyObject *d = decode(v.buf);
    PyBuffer_Release(&v);
    return d;
}

#define FAST(name, doc) {#name, (PyCFunction)(void (*)(void))ring_##name, METH_FASTCALL, doc}
static PyMethodDef methods[] = {
    FAST(bind, "bind(descriptor_type, struct_error, size, fields, doorbell_shift): "
               "check the descriptor layout and bind the Descriptor class (once, by shm/ring.py)."),
    FAST(spin, "spin(buf, off, observed, loads) -> bool: load the word until it differs "
               "from observed (GIL released after the first 32 loads)."),
    FAST(sleep_futex, "sleep_futex(buf, flags_off, bit, off, observed, timeout) -> int: "
                      "announce, re-check, futex wait (GIL released), clear."),
    {"encode", (PyCFunction)ring_encode, METH_O, "encode(desc) -> bytes: the 64 bytes of a descriptor."},
    {"decode", (PyCFunction)ring_decode, METH_O, "decode(data) -> Descriptor: from 64 bytes."},
    {NULL, NULL, 0, NULL},
};

static int
exec_module(PyObject *mod)
{
    const uint32_t one = 1;
    if (*(const char *)&one != 1) {
        PyErr_SetString(PyExc_ImportError, "shmpool._ring encodes little-endian descriptors "
                        "with native stores: big-endian hosts are not supported");
        return -1;
    }
    if (!atomic_is_lock_free((_Atomic uint32_t *)0)) {
        PyErr_SetString(PyExc_ImportError, "shmpool needs lock-free 32-bit atomics");
        return -1;
    }
    if (PyType_Ready(&ProducerType) < 0 || PyType_Ready(&ConsumerType) < 0)
        return -1;
    if (PyModule_AddObjectRef(mod, "Producer", (PyObject *)&ProducerType) < 0 ||
        PyModule_AddObjectRef(mod, "Consumer", (PyObject *)&ConsumerType) < 0 ||
        PyModule_AddIntConstant(mod, "WOKEN", WAIT_WOKEN) < 0 ||
        PyModule_AddIntConstant(mod, "VALUE_CHANGED", WAIT_VALUE_CHANGED) < 0 ||
        PyModule_AddIntConstant(mod, "TIMED_OUT", WAIT_TIMED_OUT) < 0 ||
        PyModule_AddIntConstant(mod, "NOT_SLEPT", WAIT_NOT_SLEPT) < 0 ||
        PyModule_AddIntConstant(mod, "DESCRIPTOR_SIZE", DSIZE) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmpool._ring",
    .m_doc = "The SPSC descriptor ring's per-message mechanics (shmpool layer 0).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__ring(void)
{
    return PyModuleDef_Init(&moduledef);
}
