/*
 * shmpool/_ring_codec.c -- the descriptor's encoding, for shmpool._ring.
 *
 * Owns: encoding any 9-sequence into the 64 bytes of a descriptor, all or
 * nothing, as struct.pack_into(layout.DESCRIPTOR, ...) does (the same
 * struct.error for a field out of range, "32s" truncating a longer inline
 * payload and zero-padding a shorter one); decoding 64 bytes into a new
 * Descriptor (the NamedTuple class of shm/ring.py, built as an instance of
 * that tuple subclass); and `bind`, which checks the layout declared in
 * shm/layout.py against the offsets encoded here. spec: shm.ring.native
 *
 * Invariants: native little-endian stores (_ring.c refuses big-endian
 * hosts at import); nothing is encoded or decoded before `bind`.
 */
#include "_ring.h"

#include <string.h>

PyTypeObject *ring_desc_type;
PyObject *ring_struct_error;
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

/* A new Descriptor (the NamedTuple class ring_bound at import) from 64 bytes. */
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

/* bind(descriptor_type, ring_struct_error, size, fields, ring_doorbell_shift): called
 * once by shm/ring.py at import. `fields` is ((offset, code), ...) of the
 * nine descriptor fields as shm/layout.py's DESCRIPTOR declares them; any
 * difference from what this file encodes fails the import. */
PyObject *
ring_bind(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "bind(descriptor_type, ring_struct_error, size, fields, ring_doorbell_shift)");
        return NULL;
    }
    PyObject *tp = args[0], *err = args[1];
    if (!PyType_Check(tp) || !PyType_IsSubtype((PyTypeObject *)tp, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "descriptor_type must be a tuple subclass");
        return NULL;
    }
    if (!PyExceptionClass_Check(err)) {
        PyErr_SetString(PyExc_TypeError, "ring_struct_error must be an exception class");
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
