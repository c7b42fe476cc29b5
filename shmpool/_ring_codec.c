/*
 * shmpool/_ring_codec.c -- the descriptor's encoding, for shmpool._ring.
 *
 * Owns: encoding any 9-sequence into the 64 bytes of a descriptor, all or
 * nothing, as struct.pack_into(layout.DESCRIPTOR, ...) does (the same
 * struct.error for a field out of range, "32s" truncating a longer inline
 * payload and zero-padding a shorter one); decoding 64 bytes into a new
 * Descriptor (the NamedTuple class of shm/ring.py, built as an instance of
 * that tuple subclass); the constructors Descriptor.with_inline /
 * with_slot; and `bind`, which checks the layout declared in shm/layout.py
 * against the offsets encoded here. spec: shm.ring.native
 *
 * Invariants: native little-endian stores (_ring.c refuses big-endian
 * hosts at import); nothing is encoded or decoded before `bind`.
 */
#include "_ring.h"

#include <string.h>

PyTypeObject *ring_desc_type;
PyObject *ring_struct_error;
static PyObject *inline_ref;           /* layout.SLOT_REF_INLINE */
static PyObject *zero, *no_bytes;
uint32_t ring_doorbell_shift;
int ring_bound;

static const struct { int off; char code; } FIELDS[9] = {
    {F_MSG, 'B'}, {F_FLAGS, 'B'}, {F_ID, 'I'}, {F_METHOD, 'Q'}, {F_REF, 'I'},
    {F_GEN, 'I'}, {F_POFF, 'I'}, {F_PLEN, 'I'}, {F_INLINE, 's'},
};

static int
field_uint(PyObject *o, unsigned long long max, unsigned long long *out)
{
    unsigned long long v;
    if (PyLong_CheckExact(o)) {
        v = PyLong_AsUnsignedLongLong(o);
    } else {
        if (!PyIndex_Check(o)) {
            PyErr_SetString(ring_struct_error, "required argument is not an integer");
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
            PyErr_SetString(ring_struct_error, "argument out of range");
            return -1;
        }
    }
    if (v > max) {
        PyErr_SetString(ring_struct_error, "argument out of range");
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
int
ring_encode_desc(PyObject *desc, char *dst)
{
    PyObject *fast = NULL;
    PyObject **items;
    Py_ssize_t n;
    if (PyTuple_Check(desc)) {
        n = PyTuple_GET_SIZE(desc);
        items = &PyTuple_GET_ITEM(desc, 0);
    } else {
        /* A copy: a field's __index__ (Python code) may mutate a list under
         * us, and PySequence_Fast would return the list itself (borrowed items). */
        if (Py_TYPE(desc)->tp_iter == NULL && !PySequence_Check(desc)) {
            PyErr_SetString(PyExc_TypeError, "a descriptor must be a sequence of 9 fields");
            return -1;
        }
        fast = PySequence_Tuple(desc);
        if (fast == NULL)
            return -1;
        n = PyTuple_GET_SIZE(fast);
        items = &PyTuple_GET_ITEM(fast, 0);
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
        PyErr_SetString(ring_struct_error, "argument for 's' must be a bytes object");
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
PyObject *
ring_decode_desc(const char *src)
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
    PyObject *t = ring_desc_type->tp_alloc(ring_desc_type, 9);
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

/* bind(descriptor_type, struct_error, size, fields, doorbell_shift, inline_ref): called
 * once by shm/ring.py at import. `fields` is ((offset, code), ...) of the
 * nine descriptor fields as shm/layout.py's DESCRIPTOR declares them; any
 * difference from what this file encodes fails the import. `inline_ref` is
 * the slot_ref that means "inline" (layout.SLOT_REF_INLINE). */
PyObject *
ring_bind(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "bind(descriptor_type, struct_error, size, fields, doorbell_shift, inline_ref)");
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
    Py_XSETREF(ring_desc_type, (PyTypeObject *)tp);
    Py_INCREF(err);
    Py_XSETREF(ring_struct_error, err);
    Py_INCREF(args[5]);
    Py_XSETREF(inline_ref, args[5]);
    if (zero == NULL && (zero = PyLong_FromLong(0)) == NULL)
        return NULL;
    if (no_bytes == NULL && (no_bytes = PyBytes_FromStringAndSize(NULL, 0)) == NULL)
        return NULL;
    ring_doorbell_shift = (uint32_t)shift;
    ring_bound = 1;
    Py_RETURN_NONE;
}

PyObject *
ring_encode(PyObject *m, PyObject *desc)
{
    if (!ring_bound) {
        PyErr_SetString(PyExc_RuntimeError, "shmpool._ring.bind() was not called");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, DSIZE);
    if (out == NULL)
        return NULL;
    if (ring_encode_desc(desc, PyBytes_AS_STRING(out)) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

PyObject *
ring_decode(PyObject *m, PyObject *data)
{
    if (!ring_bound) {
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
    PyObject *d = ring_decode_desc(v.buf);
    PyBuffer_Release(&v);
    return d;
}

/* ------------------------------------------------------------------------ */
/* Descriptor constructors (Descriptor.with_inline / with_slot)              */
/* ------------------------------------------------------------------------ */

/* Fill `out` from positional args and keyword names: the first `npos` names
 * may come positionally, the rest by keyword only; `out` keeps its
 * defaults for the ones not given. */
static int
parse_args(const char *fn, const char *const *names, int nnames, int npos, int nreq,
           PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject **out)
{
    if (nargs > npos) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d positional arguments (%zd given)",
                     fn, npos, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        out[i] = args[i];
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int found = -1;
        for (int j = 0; j < nnames; j++) {
            if (PyUnicode_CompareWithASCIIString(key, names[j]) == 0) {
                found = j;
                break;
            }
        }
        if (found < 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", fn, key);
            return -1;
        }
        if (found < nargs) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument %R", fn, key);
            return -1;
        }
        out[found] = args[nargs + k];
    }
    for (int j = 0; j < nreq; j++) {
        if (out[j] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fn, names[j]);
            return -1;
        }
    }
    return 0;
}

static PyObject *
new_desc(PyObject *const f[9])
{
    PyObject *t = ring_desc_type->tp_alloc(ring_desc_type, 9);
    if (t == NULL)
        return NULL;
    for (int i = 0; i < 9; i++)
        PyTuple_SET_ITEM(t, i, Py_NewRef(f[i]));
    return t;
}

/* with_inline(msg_type, id, payload=b"", *, method_id=0, flags=0): a
 * descriptor carrying up to 32 payload bytes itself. The fields are
 * stored as given (encoding checks them, as the model's pack does).
 * spec: shm.desc.inline */
PyObject *
ring_with_inline(PyObject *m, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"msg_type", "id", "payload", "method_id", "flags"};
    PyObject *a[5] = {NULL, NULL, no_bytes, zero, zero};
    if (!ring_bound) {
        PyErr_SetString(PyExc_RuntimeError, "shmpool._ring.bind() was not called");
        return NULL;
    }
    if (parse_args("with_inline", names, 5, 3, 2, args, nargs, kwnames, a) < 0)
        return NULL;
    Py_ssize_t n = PyObject_Length(a[2]);
    if (n < 0)
        return NULL;
    if (n > INLINE_CAP) {
        PyErr_Format(PyExc_ValueError, "inline payload is %zd bytes; at most %d fit", n, INLINE_CAP);
        return NULL;
    }
    PyObject *payload = PyBytes_CheckExact(a[2]) ? Py_NewRef(a[2]) : PyObject_Bytes(a[2]);
    if (payload == NULL)
        return NULL;
    PyObject *len = PyLong_FromSsize_t(n);
    if (len == NULL) {
        Py_DECREF(payload);
        return NULL;
    }
    PyObject *f[9] = {a[0], a[4], a[1], a[3], inline_ref, zero, zero, len, payload};
    PyObject *d = new_desc(f);
    Py_DECREF(len);
    Py_DECREF(payload);
    return d;
}

/* with_slot(msg_type, id, slot_ref, generation, length, *, offset=0,
 * method_id=0, flags=0): a descriptor referring to a payload in a slot.
 * spec: shm.desc.slot-ref */
PyObject *
ring_with_slot(PyObject *m, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"msg_type", "id", "slot_ref", "generation", "length",
                                        "offset", "method_id", "flags"};
    PyObject *a[8] = {NULL, NULL, NULL, NULL, NULL, zero, zero, zero};
    if (!ring_bound) {
        PyErr_SetString(PyExc_RuntimeError, "shmpool._ring.bind() was not called");
        return NULL;
    }
    if (parse_args("with_slot", names, 8, 5, 5, args, nargs, kwnames, a) < 0)
        return NULL;
    int eq = PyObject_RichCompareBool(a[2], inline_ref, Py_EQ);
    if (eq < 0)
        return NULL;
    if (eq) {
        PyErr_SetString(PyExc_ValueError, "slot_ref 0xFFFFFFFF means inline; use with_inline");
        return NULL;
    }
    PyObject *f[9] = {a[0], a[7], a[1], a[6], a[2], a[3], a[5], a[4], no_bytes};
    return new_desc(f);
}
