/*
 * shmpool._ring -- the consuming end of the SPSC descriptor ring (C half of
 * shm/ring.py's RingConsumer): try_pop, pop_batch, try_peek / release.
 *
 * Owns: `Consumer` (the type, its methods and members). What it shares with
 * the producer (the Ring struct, taking and leaving the buffer, the wake
 * decision, the bad-index report) is declared in _ring.h and defined in
 * _ring.c; the module docstring there states the invariants, which hold
 * here too: the head index the producer wrote is validated (in range,
 * only forward) before an entry is read; the tail is published with a
 * store-release after the entry was copied out. spec: shm.ring.native
 */
#include "_ring.h"

#include <structmember.h>

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
    r->reserved = 0;
    r->transfers += n;
    return ring_wake_other(r, base, v, r->tail_off, ret);
}

static PyObject *
consumer_try_pop(Ring *r, PyObject *unused)
{
    Py_buffer v;
    uint32_t bad;
    char *base = ring_acquire(r, &v);
    if (base == NULL)
        return NULL;
    uint32_t tail = r->mine;
    int has = entry_at(r, base, tail, &bad);
    if (has <= 0) {
        ring_leave(r, &v);
        if (has == RING_CORRUPT)
            return ring_bad_index(r, "head", bad, tail, tail);
        r->would_block++;
        Py_RETURN_NONE;
    }
    PyObject *d = ring_decode_desc(base + r->desc_off + (Py_ssize_t)tail * DSIZE);
    if (d == NULL) {
        ring_leave(r, &v);
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
    char *base = ring_acquire(r, &v);
    if (base == NULL)
        return NULL;
    uint32_t tail = r->mine;
    int has = entry_at(r, base, tail, &bad);
    r->reserved = has > 0;
    ring_leave(r, &v);
    if (has == RING_CORRUPT)
        return ring_bad_index(r, "head", bad, tail, tail);
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
    char *base = ring_acquire(r, &v);
    if (base == NULL)
        return NULL;
    if (!check_reserved(r, "release", "try_peek")) {
        ring_leave(r, &v);
        return NULL;
    }
    return publish_tail(r, base, &v, (r->mine + 1) & r->mask, 1, Py_NewRef(Py_None));
}

static PyObject *
consumer_pop_batch(Ring *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t max_n = 64;
    PyObject *arg = nargs == 1 ? args[0] : NULL;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nkw == 1 && nargs == 0 &&
        PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "max_n") == 0) {
        arg = args[0];
    } else if (nargs > 1 || nkw) {
        PyErr_SetString(PyExc_TypeError, "pop_batch() takes one argument, max_n");
        return NULL;
    }
    if (arg != NULL) {
        max_n = PyNumber_AsSsize_t(arg, NULL); /* (clamped: the model only compares it) */
        if (max_n == -1 && PyErr_Occurred())
            return NULL;
    }
    Py_buffer v;
    char *base = ring_acquire(r, &v);
    if (base == NULL)
        return NULL;
    uint32_t tail = r->mine, mask = r->mask, seen = r->seen;
    uint32_t head = atomic_load_explicit(WORD(base, r->head_off), memory_order_acquire);
    if (head > mask || ((head - tail) & mask) < ((seen - tail) & mask)) {
        ring_leave(r, &v);
        return ring_bad_index(r, "head", head, tail, seen);
    }
    r->seen = head;
    Py_ssize_t n = (head - tail) & mask;
    if (max_n < n)
        n = max_n < 0 ? 0 : max_n;
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        ring_leave(r, &v);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *d = ring_decode_desc(base + r->desc_off + (Py_ssize_t)((tail + i) & mask) * DSIZE);
        if (d == NULL) {
            Py_DECREF(out);
            ring_leave(r, &v);
            return NULL;
        }
        PyList_SET_ITEM(out, i, d);
    }
    if (n == 0) {
        r->would_block++;
        ring_leave(r, &v);
        return out;
    }
    return publish_tail(r, base, &v, (tail + (uint32_t)n) & mask, (unsigned long long)n, out);
}

static PyObject *
consumer_tail(Ring *r, void *unused)
{
    return PyLong_FromUnsignedLong(r->mine);
}

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

static PyMethodDef consumer_methods[] = {
    {"try_pop", (PyCFunction)consumer_try_pop, METH_NOARGS,
     "try_pop() -> Descriptor | None"},
    {"pop_batch", (PyCFunction)(void (*)(void))consumer_pop_batch, METH_FASTCALL | METH_KEYWORDS,
     "pop_batch(max_n=64) -> list[Descriptor]: pop up to max_n, publishing tail once."},
    {"try_peek", (PyCFunction)consumer_try_peek, METH_NOARGS,
     "try_peek() -> int | None: offset of the next entry, None if empty."},
    {"release", (PyCFunction)consumer_release, METH_NOARGS,
     "release(): hand the peeked entry back to the producer."},
    {"depth", (PyCFunction)ring_depth, METH_NOARGS, "depth() -> int: entries in the ring."},
    {NULL},
};

PyTypeObject RingConsumerType = {
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
