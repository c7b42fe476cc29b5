/*
 * shmpool/_ring.h -- what the three source files of the `shmpool._ring`
 * extension share: the descriptor's encoding as this extension writes it
 * (checked against shm/layout.py by `bind`), the wait statuses, and the
 * helpers each file exports to the others. See _ring.c for the module.
 */
#ifndef SHMPOOL_RING_H
#define SHMPOOL_RING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdatomic.h>
#include <stdint.h>

#ifdef __linux__
#define RING_HAVE_FUTEX 1
#else
#define RING_HAVE_FUTEX 0
#endif

/* The descriptor as this extension encodes it; `bind` checks it against
 * shm/layout.py's DESCRIPTOR, the one declaration of the layout. */
#define DSIZE 64
#define INLINE_CAP 32
enum { F_MSG = 0, F_FLAGS = 1, F_ID = 4, F_METHOD = 8, F_REF = 16, F_GEN = 20,
       F_POFF = 24, F_PLEN = 28, F_INLINE = 32 };

enum { WAIT_WOKEN = 0, WAIT_VALUE_CHANGED = 1, WAIT_TIMED_OUT = 2, WAIT_NOT_SLEPT = 3 };

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

/* Bound once by shm/ring.py at import (_ring_codec.c). */
extern PyTypeObject *ring_desc_type;   /* shm.ring.Descriptor (a tuple subclass) */
extern PyObject *ring_struct_error;    /* struct.error: what the model's pack raises */
extern uint32_t ring_doorbell_shift;   /* layout.SLEEP_DOORBELL_SHIFT */
extern int ring_bound;

/* _ring_codec.c */
int ring_encode_desc(PyObject *desc, char *dst);
PyObject *ring_decode_desc(const char *src);
PyObject *ring_bind(PyObject *m, PyObject *const *args, Py_ssize_t nargs);
PyObject *ring_encode(PyObject *m, PyObject *desc);
PyObject *ring_decode(PyObject *m, PyObject *data);
PyObject *ring_with_inline(PyObject *m, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames);
PyObject *ring_with_slot(PyObject *m, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames);

/* _ring_wait.c */
int ring_word_ok(const char *what, Py_ssize_t off, Py_buffer *v);
PyObject *ring_spin(PyObject *m, PyObject *const *args, Py_ssize_t nargs);
PyObject *ring_sleep_futex(PyObject *m, PyObject *const *args, Py_ssize_t nargs);

#endif
