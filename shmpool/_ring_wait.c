/*
 * shmpool/_ring_wait.c -- the waiter's GIL-free halves, for shmpool._ring.
 *
 * Owns: `spin` (bounded loads of a shared word, the GIL released after the
 * first few) and `sleep_futex` (one sleep of the sleeping-word protocol:
 * announce, re-check, futex wait with the GIL released, clear), which
 * shm/wait.py's Waiter calls; and the check of a 32-bit word's offset.
 *
 * Invariants: the announce and clear are seq_cst RMWs and the re-check
 * follows the announce (spec: shm.wakeup.sleeping-word); a futex wait is
 * bounded by the caller's timeout (an absolute CLOCK_MONOTONIC deadline
 * that survives EINTR); EINTR re-takes the GIL and runs the signal
 * handlers, and a raising handler ends the wait with the bit cleared.
 * spec: shm.wakeup.futex
 */
#include "_ring.h"

#include <errno.h>
#include <sched.h>
#include <time.h>

#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

int
ring_word_ok(const char *what, Py_ssize_t off, Py_buffer *v)
{
    if (off < 0 || off > v->len - 4 || ((uintptr_t)((char *)v->buf + off)) & 3) {
        PyErr_Format(PyExc_ValueError, "%s word at %zd is not an aligned 32-bit word "
                     "of the %zd-byte buffer", what, off, v->len);
        return 0;
    }
    return 1;
}

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
    if (!ring_word_ok("the", off, v)) {
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

/* spin(buf, off, observed, loads, max_ns) -> bool: load the word (acquire)
 * up to `loads` times, and for at most about `max_ns` nanoseconds, until it
 * differs from `observed`. The first 32 loads keep the GIL (most hits come
 * early and a GIL hand-off costs more than they do); the rest run with it
 * released, and every 32 loads yield the CPU and read the clock: on an
 * oversubscribed machine the peer we wait for may be queued behind us on
 * this CPU, and a spin that kept the CPU would only delay the change it
 * waits for (a ping-pong on one CPU: ~80 us a round trip without the
 * yield, ~7 us with it). spec: shm.wakeup.spin */
PyObject *
ring_spin(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "spin(buf, off, observed, loads, max_ns)");
        return NULL;
    }
    uint32_t observed;
    if (u32_of(args[2], &observed) < 0)
        return NULL;
    Py_ssize_t loads = PyNumber_AsSsize_t(args[3], PyExc_OverflowError);
    if (loads == -1 && PyErr_Occurred())
        return NULL;
    long long max_ns = PyLong_AsLongLong(args[4]);
    if (max_ns == -1 && PyErr_Occurred())
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
        struct timespec t0, now;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (; i < loads; i++) {
            if (atomic_load_explicit(p, memory_order_acquire) != observed) {
                changed = 1;
                break;
            }
            cpu_relax();
            if ((i & 31) == 31) {
                sched_yield();
                clock_gettime(CLOCK_MONOTONIC, &now);
                if ((long long)(now.tv_sec - t0.tv_sec) * 1000000000LL +
                    (now.tv_nsec - t0.tv_nsec) >= max_ns)
                    break;
            }
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
PyObject *
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
