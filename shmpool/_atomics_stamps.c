/*
 * shmpool._atomics.CallStamps -- layer 0, part of the `_atomics` module:
 * the task timeline's stamps of each call a worker runs
 * (exec/guest_trace.py, spec exec.trace-worker-clock), without a Python
 * frame per call.
 *
 * Also `trace_fields`, the host's side: a batch of tasks' fields as one
 * bytes object of int64 (exec/trace.py records each batch with it).
 *
 * Owns: `CallStamps(call, buf, word_off, capacity, every, every_ns, push)`,
 * a callable that stands in for `call` (the worker program's `_call`) and a
 * ring of at most `capacity` stamps, three u64 words each: the u32 the
 * guest word at `word_off` of `buf` holds when the call begins (acquire
 * load: the request id or batch tag), the call's start and its end on
 * CLOCK_MONOTONIC in ns (time.monotonic_ns's clock).
 *
 * Data flow: each call: guest word, clock, `call(*args, **kwargs)` (the
 * arguments passed through as they came: vectorcall), clock, the stamp
 * appended whatever the call returned or raised. Then, when `every`
 * stamps are held or `every_ns` passed since the last push, `push(now)`
 * (Python: it reads `held()` and, once they went, `drop(n)`); not
 * re-entered while it runs. `take(max)` hands out the oldest stamps and
 * forgets them at once (a batch's answer carries them), and counts as a
 * push for the next one's time. The call's result or exception is returned
 * unchanged.
 *
 * Invariants:
 *  - The ring never grows: past `capacity` the oldest stamp is overwritten
 *    and counted in `dropped`.
 *  - A push never fails the call: an Exception out of `push` (a broken
 *    contract: it catches its own) is reported as unraisable, and the
 *    call's own exception, if any, is kept. (A BaseException that is not
 *    an Exception, an exit or an interrupt, propagates.)
 *  - The buffer is acquired for the guest word's load only (never held
 *    across the call: the mapping may be closed while this object lives);
 *    the offset is bounds- and alignment-checked at each load.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *call;
    PyObject *buf;
    PyObject *push;
    Py_ssize_t word_off;
    uint64_t *ring;       /* capacity * 3 words */
    Py_ssize_t capacity;  /* stamps */
    Py_ssize_t head;      /* index of the oldest stamp */
    Py_ssize_t n;         /* stamps held */
    Py_ssize_t every;
    uint64_t every_ns;
    uint64_t due;         /* push at the end of a call at or after this */
    unsigned long long dropped;
    int pushing;
} CallStamps;

static inline uint64_t
now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* The guest word: 0 with an exception set if the buffer or offset is bad
 * (status: -1). */
static int
guest_word(CallStamps *s, uint32_t *out)
{
    Py_buffer view;
    if (PyObject_GetBuffer(s->buf, &view, PyBUF_SIMPLE) < 0)
        return -1;
    char *p = (char *)view.buf + s->word_off;
    if (s->word_off < 0 || s->word_off > view.len - 4 || ((uintptr_t)p) % 4 != 0) {
        PyErr_Format(PyExc_ValueError, "guest word offset %zd out of range or not 4-byte aligned "
                     "in a buffer of %zd bytes", s->word_off, view.len);
        PyBuffer_Release(&view);
        return -1;
    }
    *out = atomic_load_explicit((_Atomic uint32_t *)p, memory_order_acquire);
    PyBuffer_Release(&view);
    return 0;
}

static PyObject *
CallStamps_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    CallStamps *s = (CallStamps *)self;
    uint32_t rid;
    if (guest_word(s, &rid) < 0)
        return NULL;
    uint64_t t0 = now_ns();
    PyObject *r = PyObject_Vectorcall(s->call, args, nargsf, kwnames);
    uint64_t t1 = now_ns();
    Py_ssize_t i;
    if (s->n < s->capacity) {
        i = s->head + s->n;
        if (i >= s->capacity)
            i -= s->capacity;
        s->n++;
    } else {  /* full: the oldest goes */
        i = s->head;
        s->head = s->head + 1 == s->capacity ? 0 : s->head + 1;
        s->dropped++;
    }
    uint64_t *w = s->ring + 3 * i;
    w[0] = rid;
    w[1] = t0;
    w[2] = t1;
    if (!s->pushing && (s->n >= s->every || t1 >= s->due)) {
        s->due = t1 + s->every_ns;
        s->pushing = 1;
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);  /* (the call's, if it raised) */
        PyObject *now = PyLong_FromUnsignedLongLong(t1);
        PyObject *got = now == NULL ? NULL : PyObject_CallOneArg(s->push, now);
        Py_XDECREF(now);
        s->pushing = 0;
        if (got == NULL && !PyErr_ExceptionMatches(PyExc_Exception)) {
            /* An exit or an interrupt out of the push: it goes on, as it
             * would out of any code after the call (the call's outcome
             * with it). */
            Py_XDECREF(et);
            Py_XDECREF(ev);
            Py_XDECREF(tb);
            Py_XDECREF(r);
            return NULL;
        }
        if (got == NULL)
            PyErr_WriteUnraisable(s->push);
        Py_XDECREF(got);
        PyErr_Restore(et, ev, tb);
    }
    return r;
}

static PyObject *
CallStamps_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *names[] = {"call", "buf", "word_off", "capacity", "every", "every_ns", "push", NULL};
    PyObject *call, *buf, *push;
    Py_ssize_t word_off, capacity, every;
    unsigned long long every_ns;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOnnnKO:CallStamps", names, &call, &buf, &word_off,
                                     &capacity, &every, &every_ns, &push))
        return NULL;
    if (!PyCallable_Check(call) || !PyCallable_Check(push)) {
        PyErr_SetString(PyExc_TypeError, "CallStamps: call and push must be callable");
        return NULL;
    }
    if (capacity < 1 || capacity > PY_SSIZE_T_MAX / 24 || every < 1) {
        PyErr_Format(PyExc_ValueError, "CallStamps: capacity (%zd) and every (%zd) must be >= 1",
                     capacity, every);
        return NULL;
    }
    CallStamps *s = (CallStamps *)type->tp_alloc(type, 0);
    if (s == NULL)
        return NULL;
    s->ring = PyMem_Calloc((size_t)capacity * 3, sizeof(uint64_t));
    if (s->ring == NULL) {
        Py_DECREF(s);
        return PyErr_NoMemory();
    }
    s->vectorcall = CallStamps_vectorcall;
    s->call = Py_NewRef(call);
    s->buf = Py_NewRef(buf);
    s->push = Py_NewRef(push);
    s->word_off = word_off;
    s->capacity = capacity;
    s->every = every;
    s->every_ns = every_ns;
    s->due = now_ns() + every_ns;
    uint32_t probe;
    if (guest_word(s, &probe) < 0) {  /* (a bad buffer or offset: said now, not at the first call) */
        Py_DECREF(s);
        return NULL;
    }
    return (PyObject *)s;
}

static int
CallStamps_traverse(CallStamps *s, visitproc visit, void *arg)
{
    Py_VISIT(s->call);
    Py_VISIT(s->buf);
    Py_VISIT(s->push);
    return 0;
}

static int
CallStamps_clear(CallStamps *s)
{
    Py_CLEAR(s->call);
    Py_CLEAR(s->buf);
    Py_CLEAR(s->push);
    return 0;
}

static void
CallStamps_dealloc(CallStamps *s)
{
    PyObject_GC_UnTrack(s);
    CallStamps_clear(s);
    PyMem_Free(s->ring);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

/* The k oldest stamps (k <= n), as bytes. */
static PyObject *
oldest(CallStamps *s, Py_ssize_t k)
{
    PyObject *out = PyBytes_FromStringAndSize(NULL, k * 24);
    if (out == NULL)
        return NULL;
    char *p = PyBytes_AS_STRING(out);
    Py_ssize_t first = s->capacity - s->head < k ? s->capacity - s->head : k;
    memcpy(p, s->ring + 3 * s->head, (size_t)first * 24);
    memcpy(p + first * 24, s->ring, (size_t)(k - first) * 24);
    return out;
}

/* A count argument of `drop`/`take`: >= 0, cut to the stamps held (fewer
 * held than a push sent: the ring overwrote some meanwhile); -1 with an
 * exception set if it is not a count. */
static Py_ssize_t
count_arg(CallStamps *s, PyObject *arg, const char *what)
{
    Py_ssize_t k = PyNumber_AsSsize_t(arg, PyExc_OverflowError);
    if (k == -1 && PyErr_Occurred())
        return -1;
    if (k < 0) {
        PyErr_Format(PyExc_ValueError, "%s(%zd): a count must be >= 0", what, k);
        return -1;
    }
    return k > s->n ? s->n : k;
}

static void
forget(CallStamps *s, Py_ssize_t k)
{
    s->head = (s->head + k) % s->capacity;
    s->n -= k;
}

/* held() -> bytes: the stamps held, oldest first. */
static PyObject *
CallStamps_held(CallStamps *s, PyObject *unused)
{
    return oldest(s, s->n);
}

/* drop(n): forget the n oldest stamps (those a push sent). */
static PyObject *
CallStamps_drop(CallStamps *s, PyObject *arg)
{
    Py_ssize_t k = count_arg(s, arg, "drop");
    if (k < 0)
        return NULL;
    forget(s, k);
    Py_RETURN_NONE;
}

/* take(max) -> bytes: the at most `max` oldest stamps, forgotten here
 * (a batch's answer carries them: exec/guest_trace.py `tail`); counts as
 * a push for the next one's time. */
static PyObject *
CallStamps_take(CallStamps *s, PyObject *arg)
{
    Py_ssize_t k = count_arg(s, arg, "take");
    if (k < 0)
        return NULL;
    PyObject *out = oldest(s, k);
    if (out == NULL)
        return NULL;
    forget(s, k);
    s->due = now_ns() + s->every_ns;
    return out;
}

static Py_ssize_t
CallStamps_len(CallStamps *s)
{
    return s->n;
}

static PyMethodDef CallStamps_methods[] = {
    {"held", (PyCFunction)CallStamps_held, METH_NOARGS, "held() -> bytes: the stamps held, oldest first."},
    {"drop", (PyCFunction)CallStamps_drop, METH_O, "drop(n): forget the n oldest stamps."},
    {"take", (PyCFunction)CallStamps_take, METH_O,
     "take(max) -> bytes: the at most max oldest stamps, forgotten here; the next push is due every_ns from now."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef CallStamps_members[] = {
    {"dropped", T_ULONGLONG, offsetof(CallStamps, dropped), READONLY,
     "stamps overwritten because the ring was full"},
    {"call", T_OBJECT, offsetof(CallStamps, call), READONLY, "the callable stamped"},
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods CallStamps_seq = {
    .sq_length = (lenfunc)CallStamps_len,
};

static PyTypeObject CallStampsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmpool._atomics.CallStamps",
    .tp_basicsize = sizeof(CallStamps),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "CallStamps(call, buf, word_off, capacity, every, every_ns, push): `call` stamped "
              "(see shmpool/_atomics_stamps.c).",
    .tp_new = CallStamps_new,
    .tp_dealloc = (destructor)CallStamps_dealloc,
    .tp_traverse = (traverseproc)CallStamps_traverse,
    .tp_clear = (inquiry)CallStamps_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(CallStamps, vectorcall),
    .tp_methods = CallStamps_methods,
    .tp_members = CallStamps_members,
    .tp_as_sequence = &CallStamps_seq,
};

/* trace_fields(objs, attrs, names, named) -> bytes: for each object of
 * the list or tuple `objs`, for each attribute name of the tuple `attrs`,
 * one native int64: 0 if the object has no such attribute (an unset
 * slot); for attribute j with bit j of `named` set, the index `names` (a
 * dict: value -> int) gives its value, a new one (its length) the first
 * time; else its int. The host's timeline records a batch of tasks with
 * it (exec/trace.py): one bytes object, not tracked by the cyclic
 * collector, instead of a tuple per field. Errors: TypeError for a field
 * not an int, an unhashable name, or arguments of the wrong types;
 * OverflowError for an int beyond int64. */
#define MAX_FIELDS 8

static PyObject *
trace_fields(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "trace_fields() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *objs = args[0], *attrs = args[1], *names = args[2];
    unsigned long named = PyLong_AsUnsignedLong(args[3]);
    if (named == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (!PyList_Check(objs) && !PyTuple_Check(objs)) {
        PyErr_SetString(PyExc_TypeError, "trace_fields: objs must be a list or a tuple");
        return NULL;
    }
    if (!PyTuple_Check(attrs) || !PyDict_Check(names)) {
        PyErr_SetString(PyExc_TypeError, "trace_fields: attrs must be a tuple of str, names a dict");
        return NULL;
    }
    Py_ssize_t na = PyTuple_GET_SIZE(attrs);
    for (Py_ssize_t j = 0; j < na; j++) {
        if (!PyUnicode_Check(PyTuple_GET_ITEM(attrs, j))) {
            PyErr_SetString(PyExc_TypeError, "trace_fields: attrs must be a tuple of str");
            return NULL;
        }
    }
    /* (a list may change size while an attribute is read: its length is
     * read at each step, the output sized for the length at the start and
     * cut to what was filled) */
    Py_ssize_t n = PySequence_Fast_GET_SIZE(objs);
    if (na > 0 && n > PY_SSIZE_T_MAX / 8 / na) {
        PyErr_NoMemory();
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * na * 8);
    if (out == NULL)
        return NULL;
    int64_t *w = (int64_t *)PyBytes_AS_STRING(out);
    /* A slot of the first object's type (a member descriptor of an object
     * field, which no instance attribute can shadow) is read in place, for
     * that type's objects only; anything else goes through getattr. */
    PyTypeObject *slot_type = n > 0 ? Py_TYPE(PySequence_Fast_GET_ITEM(objs, 0)) : NULL;
    Py_ssize_t offsets[MAX_FIELDS];
    if (na > MAX_FIELDS) {
        PyErr_Format(PyExc_ValueError, "trace_fields: at most %d attributes", MAX_FIELDS);
        Py_DECREF(out);
        return NULL;
    }
    for (Py_ssize_t j = 0; j < na; j++) {
        offsets[j] = -1;
        PyObject *d = slot_type == NULL ? NULL : _PyType_Lookup(slot_type, PyTuple_GET_ITEM(attrs, j));
        /* (the descriptor's own class must be one of the type's: one of
         * another class, set as a class attribute, does not fit its
         * layout; getattr refuses it too) */
        if (d != NULL && Py_IS_TYPE(d, &PyMemberDescr_Type)
                && PyType_IsSubtype(slot_type, ((PyDescrObject *)d)->d_type)) {
            PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
            if (m->type == T_OBJECT_EX && m->offset > 0 && !(m->flags & PY_AUDIT_READ))
                offsets[j] = m->offset;
        }
    }
    /* A named field's last value and its index: a batch's tasks mostly
     * share their function (the same object: the dict would give the same
     * index). Strong references, released at the end. */
    PyObject *last[MAX_FIELDS] = {NULL};
    int64_t last_idx[MAX_FIELDS];
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n && i < PySequence_Fast_GET_SIZE(objs); i++) {
        PyObject *o = PySequence_Fast_GET_ITEM(objs, i);
        Py_INCREF(o);
        int fast = Py_TYPE(o) == slot_type;
        for (Py_ssize_t j = 0; j < na; j++) {
            PyObject *v;
            if (fast && offsets[j] >= 0) {
                v = *(PyObject **)((char *)o + offsets[j]);
                Py_XINCREF(v);  /* (NULL: the slot is unset, as an AttributeError) */
            } else {
                v = PyObject_GetAttr(o, PyTuple_GET_ITEM(attrs, j));
                if (v == NULL) {
                    if (!PyErr_ExceptionMatches(PyExc_AttributeError))
                        goto fail;
                    PyErr_Clear();
                }
            }
            int64_t x = 0;
            if (v == NULL) {
            } else if ((named & (1ul << j)) && v == last[j]) {
                x = last_idx[j];
            } else if (named & (1ul << j)) {
                PyObject *idx = PyDict_GetItemWithError(names, v);  /* (borrowed) */
                if (idx == NULL) {
                    if (PyErr_Occurred()) {
                        Py_DECREF(v);
                        goto fail;
                    }
                    idx = PyLong_FromSsize_t(PyDict_GET_SIZE(names));
                    if (idx == NULL || PyDict_SetItem(names, v, idx) < 0) {
                        Py_XDECREF(idx);
                        Py_DECREF(v);
                        goto fail;
                    }
                    x = PyLong_AsLongLong(idx);
                    Py_DECREF(idx);
                } else {
                    x = PyLong_AsLongLong(idx);
                    if (x == -1 && PyErr_Occurred()) {
                        Py_DECREF(v);
                        goto fail;
                    }
                }
                Py_XSETREF(last[j], Py_NewRef(v));
                last_idx[j] = x;
            } else if (PyLong_Check(v)) {
                /* (AndOverflow: a digit loop; PyLong_AsLongLong goes through
                 * a byte array for the keys, ints of two digits and more) */
                int over;
                x = PyLong_AsLongLongAndOverflow(v, &over);
                if (over) {
                    PyErr_Format(PyExc_OverflowError, "trace_fields: attribute %R does not fit int64",
                                 PyTuple_GET_ITEM(attrs, j));
                    Py_DECREF(v);
                    goto fail;
                }
            } else {
                PyErr_Format(PyExc_TypeError, "trace_fields: attribute %R is a %.100s, not an int",
                             PyTuple_GET_ITEM(attrs, j), Py_TYPE(v)->tp_name);
                Py_DECREF(v);
                goto fail;
            }
            Py_XDECREF(v);
            w[k++] = x;
        }
        Py_DECREF(o);
        continue;
    fail:
        Py_DECREF(o);
        Py_DECREF(out);
        for (Py_ssize_t j = 0; j < na; j++)
            Py_XDECREF(last[j]);
        return NULL;
    }
    for (Py_ssize_t j = 0; j < na; j++)
        Py_XDECREF(last[j]);
    if (k != n * na && _PyBytes_Resize(&out, k * 8) < 0)
        return NULL;
    return out;
}

static PyMethodDef trace_functions[] = {
    {"trace_fields", (PyCFunction)(void (*)(void))trace_fields, METH_FASTCALL,
     "trace_fields(objs, attrs, names, named) -> bytes: native int64 per object and attribute "
     "(see shmpool/_atomics_stamps.c)."},
    {NULL, NULL, 0, NULL},
};

/* Called by the module's exec slot (_atomics.c). Status: -1 with an
 * exception set. */
int
shmpool_add_call_stamps(PyObject *mod)
{
    if (PyModule_AddFunctions(mod, trace_functions) < 0)
        return -1;
    if (PyType_Ready(&CallStampsType) < 0)
        return -1;
    Py_INCREF(&CallStampsType);
    if (PyModule_AddObject(mod, "CallStamps", (PyObject *)&CallStampsType) < 0) {
        Py_DECREF(&CallStampsType);
        return -1;
    }
    return 0;
}
