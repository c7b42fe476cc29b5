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


/* One ring end (Producer or Consumer): what both C files work on. */
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
    unsigned long long transfers, would_block, wakes_sent, signal_failures;
    int consumer;
    int ready;
    int busy;             /* a call is in progress (see enter()) */
    int reserved;         /* try_reserve / try_peek handed out the entry at `mine` */
} Ring;

extern PyTypeObject RingConsumerType;

/* Statuses of the index checks: RING_CORRUPT becomes ring_bad_index(). */
enum { RING_OK = 0, RING_CORRUPT = -2 };

/* commit() / release() need an outstanding try_reserve() / try_peek(). */
static inline int
check_reserved(Ring *r, const char *what, const char *first)
{
    if (!r->reserved) {
        PyErr_Format(PyExc_RuntimeError, "%s() without %s() on ring end %U", what, first, r->name);
        return 0;
    }
    return 1;
}

/* _ring.c: shared by both ends (see their comments there). */
char *ring_acquire(Ring *r, Py_buffer *v);
PyObject *ring_bad_index(Ring *r, const char *which, uint32_t value, uint32_t mine, uint32_t seen);
PyObject *ring_wake_other(Ring *r, char *base, Py_buffer *v, Py_ssize_t word_off, PyObject *ret);
int ring_traverse(Ring *r, visitproc visit, void *arg);
int ring_clear(Ring *r);
void ring_dealloc(Ring *r);
int ring_init(Ring *r, PyObject *args, PyObject *kw);
PyObject *ring_depth(Ring *r, PyObject *unused);

static inline void
ring_leave(Ring *r, Py_buffer *v)
{
    PyBuffer_Release(v);
    r->busy = 0;
}

/* The members both ends expose (with structmember.h). */
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
    {"wakes_sent", T_ULONGLONG, offsetof(Ring, wakes_sent), 0, NULL},                      \
    {"signal_failures", T_ULONGLONG, offsetof(Ring, signal_failures), 0,                 \
     "doorbell signals that failed after a publish (counted, not raised)"}

#endif
