/*
 * shmpool._ring -- layer 0: the per-message mechanics of the SPSC
 * descriptor ring, in C.
 *
 * Owns: `Producer` (the C half of shm/ring.py's RingProducer, which
 * subclasses it: try_push / try_push_many / try_reserve / commit), what
 * both ends share (construction, taking and leaving the buffer, the wake
 * decision after publishing, the bad-index report), and the module.
 * `Consumer` (try_pop / pop_batch / try_peek / release) lives in
 * _ring_consumer.c, the descriptor's encoding and `bind` in _ring_codec.c,
 * the waiter's GIL-free halves (`spin`, `sleep_futex`) in _ring_wait.c;
 * _ring.h is what they share.
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
 *  - One caller at a time per ring end: every method sets the end's `busy`
 *    flag on entry and clears it on every exit; a call finding it set
 *    (re-entered from Python code the call runs, or another thread)
 *    raises RuntimeError and changes nothing. The doorbell's `signal()`
 *    runs after the end is left and the buffer released; its failure after
 *    a publish is counted (`signal_failures`), not raised. `commit` /
 *    `release` without an outstanding `try_reserve` / `try_peek` raise.
 *    spec: shm.ring.spsc
 *  - Waiting releases the GIL (spins after the first few loads, and every
 *    futex sleep); EINTR re-takes it, runs PyErr_CheckSignals (a raising
 *    handler aborts the wait, with the sleeping bit cleared) and retries
 *    with the same absolute deadline.
 */
#include "_ring.h"

#include <structmember.h>

#include <errno.h>
#include <string.h>

#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif


/* ------------------------------------------------------------------------ */
/* Ring ends                                                                 */
/* ------------------------------------------------------------------------ */


static PyTypeObject ProducerType;

/* The buffer for one call, and the end's busy flag. Its pointer may differ
 * between calls (a resized bytearray): length and alignment are re-checked,
 * a compare each.
 *
 * One caller at a time: a call may run Python code midway (a field's
 * __index__ while encoding, a generator in try_push_many, a finalizer run
 * by the GC while decoding, `_bad_index`), and a call of the same end made
 * from there (or from another thread that took the GIL meanwhile) would
 * move the cursor under the outer call, which then publishes an index
 * computed from a stale one: entries lost or sent twice. `busy` is set
 * here and cleared by `leave` on every exit; a call finding it set raises. */
/* The ring's buffer, checked to still hold the ring (big enough, its
 * words aligned); NULL with an exception set otherwise. */
static char *
ring_view(Ring *r, Py_buffer *v)
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

char *
ring_acquire(Ring *r, Py_buffer *v)
{
    if (r->ready && r->busy) {
        PyErr_Format(PyExc_RuntimeError, "ring end %U used concurrently (re-entered while a "
                     "call on it runs): one caller at a time", r->name);
        return NULL;
    }
    char *base = ring_view(r, v);
    if (base == NULL)
        return NULL;
    r->busy = 1;
    return base;
}


/* Turn RING_CORRUPT into the model's SegmentCorruptError: ring.py's
 * `_bad_index` composes the message and raises. */
PyObject *
ring_bad_index(Ring *r, const char *which, uint32_t value, uint32_t mine, uint32_t seen)
{
    PyObject *res = PyObject_CallMethod((PyObject *)r, "_bad_index", "sIII",
                                        which, value, mine, seen);
    if (res != NULL) {
        Py_DECREF(res);
        PyErr_Format(PyExc_RuntimeError, "_bad_index returned for %s index %u", which, value);
    }
    return NULL;
}

/* Wakes every waiter: two threads of one process waiting on the same end
 * share one flag bit, and waking one would leave the other asleep (the
 * cost is the same with one waiter). */
static int
futex_wake_all(_Atomic uint32_t *word)
{
#if RING_HAVE_FUTEX
    if (syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0) < 0)
        return -1; /* (EFAULT, EINVAL: not with a word inside the held buffer) */
#endif
    return 0;
}

/* After publishing the index at `word_off`: wake the other end if it
 * announced sleep, release the buffer and leave the call (the doorbell's
 * Python `signal()` runs with no export held and the end free). The entry
 * is published whatever happens here, so a failing wake is not raised (a
 * caller would retry and send it twice): a failed futex wake cannot happen
 * with a valid word, and a doorbell that fails (closed, a dead peer) is
 * counted in `signal_failures`; the dead-peer check notices the rest. A
 * signal handler's exception (not an Exception) still propagates.
 * spec: shm.wakeup.sleeping-word */
PyObject *
ring_wake_other(Ring *r, char *base, Py_buffer *v, Py_ssize_t word_off, PyObject *ret)
{
    uint32_t flags = atomic_fetch_or_explicit(WORD(base, r->flags_off), 0, memory_order_seq_cst);
    int ring_doorbell = 0;
    if (flags & r->wake_mask) {
        r->wakes_sent++;
        if (flags & r->wake_bit)
            (void)futex_wake_all(WORD(base, word_off));
        ring_doorbell = r->doorbell != Py_None && (flags & (r->wake_bit << ring_doorbell_shift));
    }
    ring_leave(r, v);
    if (ret == NULL || !ring_doorbell)
        return ret;
    PyObject *doorbell = Py_NewRef(r->doorbell);
    PyObject *res = PyObject_CallMethod(doorbell, "signal", NULL);
    Py_DECREF(doorbell);
    if (res != NULL) {
        Py_DECREF(res);
        return ret;
    }
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        Py_DECREF(ret);
        return NULL;
    }
    PyErr_Clear();
    r->signal_failures++;
    return ret;
}

int
ring_traverse(Ring *r, visitproc visit, void *arg)
{
    Py_VISIT(r->buf);
    Py_VISIT(r->doorbell);
    Py_VISIT(r->name);
    return 0;
}

int
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
void
ring_dealloc(Ring *r)
{
    PyObject_GC_UnTrack(r);
    ring_clear(r);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

/* Ring(buf, desc_offset, size, head_off, tail_off, flags_off, wake_bit,
 *      doorbell, name) */
int
ring_init(Ring *r, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"buf", "desc_offset", "size", "head_off", "tail_off",
                             "flags_off", "wake_bit", "doorbell", "name", NULL};
    PyObject *buf, *doorbell, *name;
    Py_ssize_t desc_off, size, head_off, tail_off, flags_off;
    unsigned int wake_bit;
    if (!ring_bound) {
        PyErr_SetString(PyExc_RuntimeError, "shmpool._ring.bind() was not called");
        return -1;
    }
    if (r->busy) {
        PyErr_SetString(PyExc_RuntimeError, "ring end re-initialised while a call on it runs");
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
    if (wake_bit == 0 || (wake_bit & (wake_bit - 1)) || (wake_bit << ring_doorbell_shift) == 0) {
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
    if (desc_off < 0 || desc_off > v.len || size > (v.len - desc_off) / DSIZE ||
        desc_off % DSIZE) {
        PyErr_Format(PyExc_ValueError, "descriptor array at %zd does not fit the buffer", desc_off);
        PyBuffer_Release(&v);
        return -1;
    }
    if (!ring_word_ok("head", head_off, &v) || !ring_word_ok("tail", tail_off, &v) ||
        !ring_word_ok("flags", flags_off, &v)) {
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
    r->wake_mask = wake_bit | (wake_bit << ring_doorbell_shift);
    r->transfers = r->would_block = r->wakes_sent = r->signal_failures = 0;
    r->reserved = 0;
    r->consumer = PyObject_TypeCheck(r, &RingConsumerType);
    r->ready = 0;
    /* A corrupt index would make this end write outside the ring. */
    if (head >= r->size) {
        ring_bad_index(r, "head", head, 0, 0);
        return -1;
    }
    if (tail >= r->size) {
        ring_bad_index(r, "tail", tail, 0, 0);
        return -1;
    }
    r->mine = r->consumer ? tail : head;
    r->seen = r->consumer ? head : tail;
    r->ready = 1;
    return 0;
}

/* Two loads, no cursor of this end moved: it takes no turn (`busy`), so
 * another thread may ask while a call of this end runs (the host's driver
 * asks whether a guest's ring holds answers while a caller pops it). */
PyObject *
ring_depth(Ring *r, PyObject *unused)
{
    Py_buffer v;
    char *base = ring_view(r, &v);
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
    r->reserved = 0;
    r->transfers += n;
    return ring_wake_other(r, base, v, r->head_off, ret);
}

static PyObject *
producer_try_push(Ring *r, PyObject *desc)
{
    Py_buffer v;
    uint32_t bad;
    char *base = ring_acquire(r, &v);
    if (base == NULL)
        return NULL;
    uint32_t head = r->mine, seen = r->seen;
    int room = room_for_one(r, base, head, &bad);
    if (room <= 0) {
        ring_leave(r, &v);
        if (room == RING_CORRUPT)
            return ring_bad_index(r, "tail", bad, head, seen);
        r->would_block++;
        Py_RETURN_FALSE;
    }
    if (ring_encode_desc(desc, base + r->desc_off + (Py_ssize_t)head * DSIZE) < 0) {
        ring_leave(r, &v);
        return NULL;
    }
    return publish_head(r, base, &v, (head + 1) & r->mask, 1, Py_NewRef(Py_True));
}

static PyObject *
producer_try_push_many(Ring *r, PyObject *descs)
{
    Py_buffer v;
    uint32_t bad;
    char *base = ring_acquire(r, &v);
    if (base == NULL)
        return NULL;
    uint32_t start = r->mine, head = start, seen = r->seen;
    if (reload_tail(r, base, head, &bad) < 0) {
        ring_leave(r, &v);
        return ring_bad_index(r, "tail", bad, head, seen);
    }
    uint32_t room = (r->seen - head - 1) & r->mask;
    PyObject *it = PyObject_GetIter(descs);
    if (it == NULL) {
        ring_leave(r, &v);
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
        int rc = ring_encode_desc(d, base + r->desc_off + (Py_ssize_t)head * DSIZE);
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
        ring_leave(r, &v);
        return PyLong_FromUnsignedLong(n);
    }
    return publish_head(r, base, &v, head, n, PyLong_FromUnsignedLong(n));
fail:
    Py_DECREF(it);
    ring_leave(r, &v);
    return NULL;
}

static PyObject *
producer_try_reserve(Ring *r, PyObject *unused)
{
    Py_buffer v;
    uint32_t bad;
    char *base = ring_acquire(r, &v);
    if (base == NULL)
        return NULL;
    uint32_t head = r->mine, seen = r->seen;
    int room = room_for_one(r, base, head, &bad);
    r->reserved = room > 0;
    ring_leave(r, &v);
    if (room == RING_CORRUPT)
        return ring_bad_index(r, "tail", bad, head, seen);
    if (room == 0) {
        r->would_block++;
        Py_RETURN_NONE;
    }
    return PyLong_FromSsize_t(r->desc_off + (Py_ssize_t)head * DSIZE);
}

/* commit() / release() publish the entry try_reserve() / try_peek() handed
 * out; without one, the index would move past the other end's. */

static PyObject *
producer_commit(Ring *r, PyObject *unused)
{
    Py_buffer v;
    char *base = ring_acquire(r, &v);
    if (base == NULL)
        return NULL;
    if (!check_reserved(r, "commit", "try_reserve")) {
        ring_leave(r, &v);
        return NULL;
    }
    return publish_head(r, base, &v, (r->mine + 1) & r->mask, 1, Py_NewRef(Py_None));
}

/* -- consumer ------------------------------------------------------------ */

/* An entry at `tail`? 1 yes, 0 empty, RING_CORRUPT. The head is reloaded
 * only when the cached one says empty; for an empty ring any in-range head
 * is a forward move. spec: shm.ordering.ring-consume */
/* -- types ---------------------------------------------------------------- */

static PyMemberDef producer_members[] = {
    COMMON_MEMBERS,
    {"_head", T_UINT, offsetof(Ring, mine), READONLY, "this end's head"},
    {"_tail_seen", T_UINT, offsetof(Ring, seen), READONLY, "the tail last validated"},
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

#define FAST(name, doc) {#name, (PyCFunction)(void (*)(void))ring_##name, METH_FASTCALL, doc}
static PyMethodDef methods[] = {
    FAST(bind, "bind(descriptor_type, struct_error, size, fields, doorbell_shift, inline_ref): "
               "check the descriptor layout and bind the Descriptor class (once, by shm/ring.py)."),
    FAST(spin, "spin(buf, off, observed, loads, max_ns) -> bool: load the word until it "
               "differs from observed (GIL released after the first 32 loads, CPU yielded "
               "every 32 after that)."),
    FAST(sleep_futex, "sleep_futex(buf, flags_off, bit, off, observed, timeout) -> int: "
                      "announce, re-check, futex wait (GIL released), clear."),
    {"encode", (PyCFunction)ring_encode, METH_O, "encode(desc) -> bytes: the 64 bytes of a descriptor."},
    {"decode", (PyCFunction)ring_decode, METH_O, "decode(data) -> Descriptor: from 64 bytes."},
    {"with_inline", (PyCFunction)(void (*)(void))ring_with_inline, METH_FASTCALL | METH_KEYWORDS,
     "with_inline(msg_type, id, payload=b'', *, method_id=0, flags=0) -> Descriptor: "
     "one carrying up to 32 payload bytes itself."},
    {"with_slot", (PyCFunction)(void (*)(void))ring_with_slot, METH_FASTCALL | METH_KEYWORDS,
     "with_slot(msg_type, id, slot_ref, generation, length, *, offset=0, method_id=0, flags=0) "
     "-> Descriptor: one referring to a payload in a slot."},
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
    if (PyType_Ready(&ProducerType) < 0 || PyType_Ready(&RingConsumerType) < 0)
        return -1;
    if (PyModule_AddObjectRef(mod, "Producer", (PyObject *)&ProducerType) < 0 ||
        PyModule_AddObjectRef(mod, "Consumer", (PyObject *)&RingConsumerType) < 0 ||
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
