/*
 * shmpool._atomics -- layer 0: the only things Python cannot do itself.
 *
 * Owns: atomic loads/stores/read-modify-writes on 32- and 64-bit words that
 * live at a byte offset inside a writable buffer (in practice a MAP_SHARED
 * mapping of the segment file), and futex wait/wake on 32-bit words there.
 *
 * Data flow: Python passes (buffer, offset, values...). Each call acquires a
 * writable, C-contiguous buffer view, checks bounds and natural alignment,
 * performs one C11 atomic operation (or one futex call) and releases the view.
 *
 * Invariants:
 *  - Expected conditions are return values, never exceptions: compare-exchange
 *    returns the previous value; futex_wait returns WOKEN / VALUE_CHANGED /
 *    TIMED_OUT. Exceptions mean a broken contract: bad offset (ValueError),
 *    read-only or non-buffer object (TypeError), value out of range
 *    (OverflowError), or a signal handler that raised.
 *  - futex_wait releases the GIL while blocked. The buffer view stays
 *    acquired for the duration, so the mapping cannot be closed under it.
 *  - EINTR: the GIL is re-taken, PyErr_CheckSignals() runs (so Ctrl-C and
 *    signal handlers work), and the wait resumes with the same absolute
 *    deadline.
 *  - Futexes are process-shared (no FUTEX_PRIVATE_FLAG): the words live in a
 *    file mapping shared by several processes.
 *
 *  - page_copy/page_move/page_free: around a fork(), the pages under a
 *    buffer become, in the child, a private copy of what they held at the
 *    fork, at the same addresses (zero-copy results stop sharing memory).
 *
 *  - `CallStamps` (its own file, _atomics_stamps.c): the task timeline's
 *    stamps of each call a worker runs, with no Python frame per call.
 *
 * spec: shm.ordering.atomics
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <sched.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#ifdef __linux__
#include <linux/futex.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#define SHMPOOL_HAVE_FUTEX 1
#else
#define SHMPOOL_HAVE_FUTEX 0
#endif

enum { WAIT_WOKEN = 0, WAIT_VALUE_CHANGED = 1, WAIT_TIMED_OUT = 2 };

/* ------------------------------------------------------------------------ */
/* Argument helpers                                                          */
/* ------------------------------------------------------------------------ */

/* Acquire a writable contiguous view of `obj` and return a pointer to the
 * naturally aligned word of `width` bytes at `off_obj`. On failure an
 * exception is set and NULL returned (the view is released). */
static void *
word_at(PyObject *obj, PyObject *off_obj, Py_ssize_t width, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0) {
        if (PyErr_ExceptionMatches(PyExc_BufferError) ||
            PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "expected a writable contiguous buffer, got %.100s",
                         Py_TYPE(obj)->tp_name);
        }
        return NULL;
    }
    if (view->readonly) {
        PyErr_Format(PyExc_TypeError,
                     "buffer of type %.100s is read-only; atomics need a "
                     "writable mapping", Py_TYPE(obj)->tp_name);
        PyBuffer_Release(view);
        return NULL;
    }
    /* NULL: clamp out-of-range ints so that the range check below reports
     * them as a ValueError like any other bad offset. */
    Py_ssize_t off = PyNumber_AsSsize_t(off_obj, NULL);
    if (off == -1 && PyErr_Occurred()) {
        PyBuffer_Release(view);
        return NULL;
    }
    if (off < 0 || off > view->len - width) {
        PyErr_Format(PyExc_ValueError,
                     "offset %zd out of range for a %zd-byte word in a "
                     "buffer of %zd bytes", off, width, view->len);
        PyBuffer_Release(view);
        return NULL;
    }
    char *p = (char *)view->buf + off;
    if (((uintptr_t)p) % (uintptr_t)width != 0) {
        PyErr_Format(PyExc_ValueError,
                     "offset %zd is not %zd-byte aligned (atomics need "
                     "natural alignment)", off, width);
        PyBuffer_Release(view);
        return NULL;
    }
    return p;
}

static int
u32_arg(PyObject *o, const char *what, uint32_t *out)
{
    PyObject *n = PyNumber_Index(o); /* accepts numpy integers too */
    if (n == NULL)
        return -1;
    unsigned long v = PyLong_AsUnsignedLong(n);
    Py_DECREF(n);
    if (v == (unsigned long)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_OverflowError,
                         "%s must be in range [0, 2**32)", what);
        }
        return -1;
    }
    if (v > 0xFFFFFFFFUL) {
        PyErr_Format(PyExc_OverflowError, "%s must be in range [0, 2**32)",
                     what);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

static int
u64_arg(PyObject *o, const char *what, uint64_t *out)
{
    PyObject *n = PyNumber_Index(o);
    if (n == NULL)
        return -1;
    unsigned long long v = PyLong_AsUnsignedLongLong(n);
    Py_DECREF(n);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_OverflowError,
                         "%s must be in range [0, 2**64)", what);
        }
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

/* Deltas and masks for read-modify-write are taken modulo 2**N so that
 * fetch_add(buf, off, -1) decrements. */
static int
mask_arg(PyObject *o, uint64_t *out)
{
    PyObject *n = PyNumber_Index(o);
    if (n == NULL)
        return -1;
    unsigned long long v = PyLong_AsUnsignedLongLongMask(n);
    Py_DECREF(n);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (uint64_t)v;
    return 0;
}

static int
nargs_ok(const char *name, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd arguments "
                     "(%zd given)", name, want, nargs);
        return 0;
    }
    return 1;
}

/* ------------------------------------------------------------------------ */
/* Atomics: one macro body per (width, operation)                            */
/* ------------------------------------------------------------------------ */

#define DEFINE_LOAD(NAME, T, WIDTH, BOX)                                      \
static PyObject *                                                             \
NAME(PyObject *m, PyObject *const *args, Py_ssize_t nargs)                    \
{                                                                             \
    Py_buffer view;                                                           \
    if (!nargs_ok(#NAME, nargs, 2)) return NULL;                              \
    _Atomic T *p = word_at(args[0], args[1], WIDTH, &view);                   \
    if (p == NULL) return NULL;                                               \
    T v = atomic_load_explicit(p, memory_order_acquire);                      \
    PyBuffer_Release(&view);                                                  \
    return BOX(v);                                                            \
}

#define DEFINE_STORE(NAME, T, WIDTH, CONV)                                    \
static PyObject *                                                             \
NAME(PyObject *m, PyObject *const *args, Py_ssize_t nargs)                    \
{                                                                             \
    Py_buffer view;                                                           \
    T v;                                                                      \
    if (!nargs_ok(#NAME, nargs, 3)) return NULL;                              \
    if (CONV(args[2], "value", &v) < 0) return NULL;                          \
    _Atomic T *p = word_at(args[0], args[1], WIDTH, &view);                   \
    if (p == NULL) return NULL;                                               \
    atomic_store_explicit(p, v, memory_order_release);                        \
    PyBuffer_Release(&view);                                                  \
    Py_RETURN_NONE;                                                           \
}

/* Compare-exchange returns the value seen before the operation; it
 * succeeded iff that equals `expected`. Strong CAS, acq_rel on success,
 * acquire on failure. */
#define DEFINE_CAS(NAME, T, WIDTH, CONV, BOX)                                 \
static PyObject *                                                             \
NAME(PyObject *m, PyObject *const *args, Py_ssize_t nargs)                    \
{                                                                             \
    Py_buffer view;                                                           \
    T expected, desired;                                                      \
    if (!nargs_ok(#NAME, nargs, 4)) return NULL;                              \
    if (CONV(args[2], "expected", &expected) < 0) return NULL;                \
    if (CONV(args[3], "desired", &desired) < 0) return NULL;                  \
    _Atomic T *p = word_at(args[0], args[1], WIDTH, &view);                   \
    if (p == NULL) return NULL;                                               \
    atomic_compare_exchange_strong_explicit(                                  \
        p, &expected, desired, memory_order_acq_rel, memory_order_acquire);   \
    PyBuffer_Release(&view);                                                  \
    return BOX(expected);                                                     \
}

/* Read-modify-writes are sequentially consistent: the wait protocol relies
 * on an RMW of the "sleeping" word ordering the store before it against the
 * load after it (store-buffer / Dekker pattern). */
#define DEFINE_RMW(NAME, T, WIDTH, OP, BOX)                                   \
static PyObject *                                                             \
NAME(PyObject *m, PyObject *const *args, Py_ssize_t nargs)                    \
{                                                                             \
    Py_buffer view;                                                           \
    uint64_t operand;                                                         \
    if (!nargs_ok(#NAME, nargs, 3)) return NULL;                              \
    if (mask_arg(args[2], &operand) < 0) return NULL;                         \
    _Atomic T *p = word_at(args[0], args[1], WIDTH, &view);                   \
    if (p == NULL) return NULL;                                               \
    T old = OP(p, (T)operand, memory_order_seq_cst);                          \
    PyBuffer_Release(&view);                                                  \
    return BOX(old);                                                          \
}

#define BOX32(v) PyLong_FromUnsignedLong((unsigned long)(v))
#define BOX64(v) PyLong_FromUnsignedLongLong((unsigned long long)(v))

DEFINE_LOAD(load_u32, uint32_t, 4, BOX32)
DEFINE_LOAD(load_u64, uint64_t, 8, BOX64)
DEFINE_STORE(store_u32, uint32_t, 4, u32_arg)
DEFINE_STORE(store_u64, uint64_t, 8, u64_arg)
DEFINE_CAS(cas_u32, uint32_t, 4, u32_arg, BOX32)
DEFINE_CAS(cas_u64, uint64_t, 8, u64_arg, BOX64)
DEFINE_RMW(fetch_add_u32, uint32_t, 4, atomic_fetch_add_explicit, BOX32)
DEFINE_RMW(fetch_add_u64, uint64_t, 8, atomic_fetch_add_explicit, BOX64)
DEFINE_RMW(fetch_or_u32, uint32_t, 4, atomic_fetch_or_explicit, BOX32)
DEFINE_RMW(fetch_or_u64, uint64_t, 8, atomic_fetch_or_explicit, BOX64)
DEFINE_RMW(fetch_and_u32, uint32_t, 4, atomic_fetch_and_explicit, BOX32)
DEFINE_RMW(fetch_and_u64, uint64_t, 8, atomic_fetch_and_explicit, BOX64)

/* ------------------------------------------------------------------------ */
/* Futex                                                                     */
/* ------------------------------------------------------------------------ */

/* spec: shm.wakeup.futex */
static PyObject *
futex_wait(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    uint32_t expected;
    struct timespec deadline, *dl = NULL;

    if (nargs < 3 || nargs > 4) {
        PyErr_Format(PyExc_TypeError, "futex_wait() takes 3 or 4 arguments "
                     "(%zd given)", nargs);
        return NULL;
    }
    if (u32_arg(args[2], "expected", &expected) < 0)
        return NULL;
    if (nargs == 4 && args[3] != Py_None) {
        double t = PyFloat_AsDouble(args[3]);
        if (t == -1.0 && PyErr_Occurred())
            return NULL;
        if (!(t >= 0.0) || t > 1e9) { /* also rejects NaN */
            PyErr_SetString(PyExc_ValueError,
                            "timeout must be None or a number of seconds in "
                            "[0, 1e9]");
            return NULL;
        }
        clock_gettime(CLOCK_MONOTONIC, &deadline);
        double whole = (double)(time_t)t;
        deadline.tv_sec += (time_t)t;
        deadline.tv_nsec += (long)((t - whole) * 1e9);
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec += 1;
            deadline.tv_nsec -= 1000000000L;
        }
        dl = &deadline;
    }
    uint32_t *p = word_at(args[0], args[1], 4, &view);
    if (p == NULL)
        return NULL;

#if SHMPOOL_HAVE_FUTEX
    for (;;) {
        long rc;
        int err;
        Py_BEGIN_ALLOW_THREADS
        /* FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC deadline, so
         * a retry after EINTR keeps the caller's overall timeout. */
        rc = syscall(SYS_futex, p, FUTEX_WAIT_BITSET, expected, dl, NULL,
                     FUTEX_BITSET_MATCH_ANY);
        err = errno;
        Py_END_ALLOW_THREADS
        if (rc == 0) {
            PyBuffer_Release(&view);
            return PyLong_FromLong(WAIT_WOKEN);
        }
        if (err == EAGAIN) {
            PyBuffer_Release(&view);
            return PyLong_FromLong(WAIT_VALUE_CHANGED);
        }
        if (err == ETIMEDOUT) {
            PyBuffer_Release(&view);
            return PyLong_FromLong(WAIT_TIMED_OUT);
        }
        if (err == EINTR) {
            if (PyErr_CheckSignals() < 0) {
                PyBuffer_Release(&view);
                return NULL;
            }
            continue;
        }
        PyBuffer_Release(&view);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
#else
    PyBuffer_Release(&view);
    PyErr_SetString(PyExc_NotImplementedError,
                    "futex is Linux-only; use SHMPOOL_WAIT=poll");
    return NULL;
#endif
}

/* spin_u32(buf, off, observed, max_ns) -> bool: load the word (acquire)
 * until it differs from `observed` or `max_ns` nanoseconds passed, with
 * the GIL released, so that other threads of this process run meanwhile
 * (a spin in Python would hold the GIL for its whole length). True if it
 * changed. The clock is read, and the CPU yielded, every 64 loads: the
 * writer may be waiting for this very CPU (as `_ring.spin` does; a
 * ping-pong on one CPU takes ~80 us without the yield, ~7 us with it).
 * spec: shm.wakeup.spin */
static PyObject *
spin_u32(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    uint32_t observed;
    if (!nargs_ok("spin_u32", nargs, 4))
        return NULL;
    if (u32_arg(args[2], "observed", &observed) < 0)
        return NULL;
    long long max_ns = PyLong_AsLongLong(args[3]);
    if (max_ns == -1 && PyErr_Occurred())
        return NULL;
    if (max_ns < 0 || max_ns > 1000000000LL) {
        PyErr_SetString(PyExc_ValueError, "max_ns must be in [0, 1e9]");
        return NULL;
    }
    _Atomic uint32_t *p = word_at(args[0], args[1], 4, &view);
    if (p == NULL)
        return NULL;
    int changed = 0;
    Py_BEGIN_ALLOW_THREADS
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if (atomic_load_explicit(p, memory_order_acquire) != observed) {
                changed = 1;
                break;
            }
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#elif defined(__aarch64__)
            __asm__ __volatile__("yield");
#endif
        }
        if (changed)
            break;
        sched_yield();
        clock_gettime(CLOCK_MONOTONIC, &now);
        long long dt = (long long)(now.tv_sec - t0.tv_sec) * 1000000000LL + (now.tv_nsec - t0.tv_nsec);
        if (dt >= max_ns)
            break;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyBool_FromLong(changed);
}

static PyObject *
futex_wake(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (!nargs_ok("futex_wake", nargs, 3))
        return NULL;
    long n = PyLong_AsLong(args[2]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 1 || n > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "n must be in range [1, 2**31)");
        return NULL;
    }
    uint32_t *p = word_at(args[0], args[1], 4, &view);
    if (p == NULL)
        return NULL;
#if SHMPOOL_HAVE_FUTEX
    long rc = syscall(SYS_futex, p, FUTEX_WAKE, (int)n, NULL, NULL, 0);
    int err = errno;
    PyBuffer_Release(&view);
    if (rc < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(rc);
#else
    PyBuffer_Release(&view);
    PyErr_SetString(PyExc_NotImplementedError,
                    "futex is Linux-only; use SHMPOOL_WAIT=poll");
    return NULL;
#endif
}

/* ------------------------------------------------------------------------ */
/* Private copies (fork() children)                                          */
/* ------------------------------------------------------------------------ */

/* A fork() parent's results viewing its shared segment must not change
 * under the child, nor be written by it, and a fork shares MAP_SHARED pages:
 * before the fork (parent) `page_copy(buf)` copies the whole pages under
 * `buf` (rounded out: a slot's data need not be page-aligned) into a fresh
 * private anonymous mapping, which the child inherits copy-on-write as it
 * was at the fork; in the child `page_move` moves that copy over the
 * original pages with mremap(MREMAP_FIXED), which atomically drops the
 * shared pages there (same addresses: every object viewing them keeps its
 * bytes, now the child's own); in the parent `page_free` unmaps its copy.
 * Addresses travel as ints: these are for `exec/forksafe.py` only. */

static PyObject *
page_copy(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (!nargs_ok("page_copy", nargs, 1))
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
#ifdef __linux__
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)view.buf & ~(page - 1);
    uintptr_t end = ((uintptr_t)view.buf + (uintptr_t)view.len + page - 1) & ~(page - 1);
    size_t n = end - start;
    void *copy = NULL;
    if (n) {
        copy = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (copy == MAP_FAILED)
            copy = NULL;  /* (no memory: the child gets zero pages, see page_move) */
        else
            memcpy(copy, (void *)start, n);
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(KKn)", (unsigned long long)(uintptr_t)copy,
                         (unsigned long long)start, (Py_ssize_t)n);
#else
    PyBuffer_Release(&view);
    PyErr_SetString(PyExc_NotImplementedError, "page_copy is Linux-only (mremap)");
    return NULL;
#endif
}

/* page_move(copy, start, n, zero_fallback=True) -> bool: the copy
 * replaces the pages at start. If that fails (or copy is 0: no copy could
 * be made), with zero_fallback (a fork child: the range must never stay
 * shared with another process) fresh zero pages replace them instead and
 * False is returned; without it (a process keeping its own results) the
 * range is left as it was, the copy unmapped, and False returned. OSError
 * if neither could be done (the range is unchanged). */
static PyObject *
page_move(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long long copy, start;
    Py_ssize_t n;
    int zero_fallback = 1;
    if (nargs != 3 && nargs != 4) {
        PyErr_Format(PyExc_TypeError, "page_move() takes 3 or 4 arguments (%zd given)", nargs);
        return NULL;
    }
    copy = PyLong_AsUnsignedLongLong(args[0]);
    start = PyLong_AsUnsignedLongLong(args[1]);
    n = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (nargs == 4 && (zero_fallback = PyObject_IsTrue(args[3])) < 0)
        return NULL;
#ifdef __linux__
    if (n <= 0)
        Py_RETURN_TRUE;
    if (copy && mremap((void *)(uintptr_t)copy, (size_t)n, (size_t)n, MREMAP_MAYMOVE | MREMAP_FIXED,
                       (void *)(uintptr_t)start) != MAP_FAILED)
        Py_RETURN_TRUE;
    int err = errno;
    if (!zero_fallback) {
        if (copy)
            munmap((void *)(uintptr_t)copy, (size_t)n);
        Py_RETURN_FALSE;
    }
    if (mmap((void *)(uintptr_t)start, (size_t)n, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0) != MAP_FAILED) {
        if (copy)
            munmap((void *)(uintptr_t)copy, (size_t)n);
        Py_RETURN_FALSE;
    }
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
#else
    PyErr_SetString(PyExc_NotImplementedError, "page_move is Linux-only (mremap)");
    return NULL;
#endif
}

/* page_free(copy, n): unmap a copy page_copy made (the parent, after the fork). */
static PyObject *
page_free(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (!nargs_ok("page_free", nargs, 2))
        return NULL;
    unsigned long long copy = PyLong_AsUnsignedLongLong(args[0]);
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred())
        return NULL;
#ifdef __linux__
    if (copy && n > 0 && munmap((void *)(uintptr_t)copy, (size_t)n) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
#endif
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------ */
/* fork_child: the hub's fork start method                                   */
/* ------------------------------------------------------------------------ */

int shmpool_adopt_main_tstate(void); /* _atomics_fork.c */

/* fork_child() -> pid in the parent, 0 in the child, -errno if fork failed.
 * What os.fork does (PyOS_BeforeFork / fork / PyOS_AfterFork_Parent or
 * _Child: the at-fork handlers run, the child's interpreter is sound), but
 * without its DeprecationWarning about threads: whether the stdlib would
 * warn is decided in Python (hub/launch.py), which knows shmpool's own
 * threads. Status code: Python raises. */
static PyObject *
fork_child(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (!nargs_ok("fork_child", nargs, 0))
        return NULL;
    PyOS_BeforeFork();
    pid_t pid = fork();
    int err = errno;
    if (pid == 0) {
        PyOS_AfterFork_Child();
        /* the child's thread runs the Python signal handlers (spec: exec.fork-signals) */
        (void)shmpool_adopt_main_tstate();
    } else {
        PyOS_AfterFork_Parent();
    }
    if (pid < 0)
        return PyLong_FromLong(-(long)err);
    return PyLong_FromLong((long)pid);
}

/* ------------------------------------------------------------------------ */
/* The start stamp of a timed call (exec/stopping.py, spec exec.timeout-clock) */
/* ------------------------------------------------------------------------ */

/* stamp_call(buf, rid_off, time_off, rid): the id word <- 0, the time word
 * <- CLOCK_MONOTONIC in ns (time.monotonic_ns's clock), the id word <- rid,
 * each a release store, in that order: a reader that finds `rid` in the id
 * word both before and after its read of the time word has this call's
 * stamp, never an earlier one. One call instead of four from Python: it is
 * on the worker's path for every timed call. */
static PyObject *
stamp_call(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    uint32_t rid;
    if (!nargs_ok("stamp_call", nargs, 4)) return NULL;
    if (u32_arg(args[3], "rid", &rid) < 0) return NULL;
    _Atomic uint32_t *id = word_at(args[0], args[1], 4, &view);
    if (id == NULL) return NULL;
    Py_ssize_t toff = PyNumber_AsSsize_t(args[2], NULL);
    if (toff == -1 && PyErr_Occurred()) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (toff < 0 || toff > view.len - 8 || ((uintptr_t)((char *)view.buf + toff)) % 8 != 0) {
        PyErr_Format(PyExc_ValueError, "offset %zd out of range or not 8-byte aligned for an "
                     "8-byte word in a buffer of %zd bytes", toff, view.len);
        PyBuffer_Release(&view);
        return NULL;
    }
    _Atomic uint64_t *t = (_Atomic uint64_t *)((char *)view.buf + toff);
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    atomic_store_explicit(id, 0, memory_order_release);
    atomic_store_explicit(t, (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec,
                          memory_order_release);
    atomic_store_explicit(id, rid, memory_order_release);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------ */
/* Module                                                                    */
/* ------------------------------------------------------------------------ */

#define FAST(name, doc) {#name, (PyCFunction)(void (*)(void))name, \
                         METH_FASTCALL, doc}

static PyMethodDef methods[] = {
    FAST(load_u32, "load_u32(buf, off) -> int: atomic load, acquire."),
    FAST(load_u64, "load_u64(buf, off) -> int: atomic load, acquire."),
    FAST(store_u32, "store_u32(buf, off, value): atomic store, release."),
    FAST(store_u64, "store_u64(buf, off, value): atomic store, release."),
    FAST(stamp_call, "stamp_call(buf, rid_off, time_off, rid): id word <- 0, time word <- "
                     "CLOCK_MONOTONIC ns, id word <- rid (release stores, in order)."),
    FAST(cas_u32, "cas_u32(buf, off, expected, desired) -> previous value "
                  "(success iff it equals expected)."),
    FAST(cas_u64, "cas_u64(buf, off, expected, desired) -> previous value "
                  "(success iff it equals expected)."),
    FAST(fetch_add_u32, "fetch_add_u32(buf, off, delta) -> previous value; "
                        "delta modulo 2**32, seq_cst."),
    FAST(fetch_add_u64, "fetch_add_u64(buf, off, delta) -> previous value; "
                        "delta modulo 2**64, seq_cst."),
    FAST(fetch_or_u32, "fetch_or_u32(buf, off, bits) -> previous value."),
    FAST(fetch_or_u64, "fetch_or_u64(buf, off, bits) -> previous value."),
    FAST(fetch_and_u32, "fetch_and_u32(buf, off, bits) -> previous value."),
    FAST(fetch_and_u64, "fetch_and_u64(buf, off, bits) -> previous value."),
    FAST(futex_wait, "futex_wait(buf, off, expected, timeout=None) -> "
                     "WOKEN | VALUE_CHANGED | TIMED_OUT. Releases the GIL."),
    FAST(futex_wake, "futex_wake(buf, off, n) -> number of waiters woken."),
    FAST(spin_u32, "spin_u32(buf, off, observed, max_ns) -> bool: spin (GIL released) "
                   "until the word differs from observed or max_ns passed."),
    FAST(page_copy, "page_copy(buf) -> (copy, start, n): a private copy of the "
                    "pages under buf (before a fork)."),
    FAST(page_move, "page_move(copy, start, n, zero_fallback=True) -> bool: the copy "
                    "replaces the pages at start (False: zero pages, or unchanged without "
                    "zero_fallback)."),
    FAST(page_free, "page_free(copy, n): unmap a copy (the parent, after a fork)."),
    FAST(fork_child, "fork_child() -> pid (parent), 0 (child) or -errno: fork with the "
                     "interpreter's at-fork handling, no warning."),
    {NULL, NULL, 0, NULL},
};

int shmpool_add_call_stamps(PyObject *mod);  /* _atomics_stamps.c: `CallStamps` */

static int
exec_module(PyObject *mod)
{
    if (shmpool_add_call_stamps(mod) < 0)
        return -1;
    if (PyModule_AddIntConstant(mod, "WOKEN", WAIT_WOKEN) < 0 ||
        PyModule_AddIntConstant(mod, "VALUE_CHANGED", WAIT_VALUE_CHANGED) < 0 ||
        PyModule_AddIntConstant(mod, "TIMED_OUT", WAIT_TIMED_OUT) < 0 ||
        PyModule_AddIntConstant(mod, "HAVE_FUTEX", SHMPOOL_HAVE_FUTEX) < 0)
        return -1;
    /* Lock-free atomics are a hard requirement: a lock-based fallback would
     * use a process-local lock and silently break cross-process exclusion. */
    if (!atomic_is_lock_free((_Atomic uint64_t *)0) ||
        !atomic_is_lock_free((_Atomic uint32_t *)0)) {
        PyErr_SetString(PyExc_ImportError,
                        "shmpool needs lock-free 32- and 64-bit atomics");
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmpool._atomics",
    .m_doc = "Atomics and futex on shared buffers (shmpool layer 0).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__atomics(void)
{
    return PyModuleDef_Init(&moduledef);
}
