/*
 * shmpool._guestloop -- layer 0: the guest's announcement of what it
 * published into its guest->host ring (spec: shm.wakeup.guest-announce).
 *
 * Owns: `Announcer`, one per attached guest: the check of the host's
 * sleeping word (and of the entry's host-polling flag) after a publish, the
 * doorbell byte when the host sleeps, and a timer thread that makes that
 * check for answers the guest published without announcing them
 * (`defer`), at most `bound_ns` after the oldest of them, whatever the
 * guest's main thread is doing (a long task holding the GIL included).
 *
 * Data flow: the main thread publishes an answer into the ring (head store)
 * and calls `defer()`, which reads the host-sleeping word (and the
 * host-polling flag) with RMWs as an announcement does: if the host is
 * awake, its re-check before sleeping sees the answer and nothing more is
 * needed; if it sleeps, the first such answer since the last announcement
 * is recorded (its time; state PENDING, no syscall). Before the main thread
 * runs anything next (a handler, a batch's next task) it calls `busy()`,
 * which arms the timer (a timerfd set to that time plus `bound_ns`: one
 * syscall, no wake-up of the timer thread, which blocks on the timerfd), or
 * announces at once if that time has passed. `announce()` / `flush()` (the
 * main thread, when it publishes anything else or is about to wait)
 * disarm and announce: a worker that answers and then waits never touches
 * the timer. If the timer fires while still armed, the timer thread
 * disarms and announces itself. The
 * protocol decisions (what is deferred, when to announce) are the
 * Python caller's (hub/guest.py); this does the mechanics without the GIL.
 *
 * Invariants:
 *  - An announcement is two sequentially consistent read-modify-writes
 *    (the header's host-sleeping word, then the entry's host-polling flag)
 *    made after the head store of everything it announces, and at most one
 *    doorbell byte (MSG_DONTWAIT|MSG_NOSIGNAL): never blocks, never
 *    raises for a full socket buffer (coalesced) or a dead peer.
 *  - Announcing twice, or early, is harmless; disarming is a CAS, so an
 *    announcement by one thread never hides answers deferred after it.
 *  - The buffer view is held from construction to `close()`: the mapping
 *    cannot be closed under the timer thread. `close()` stops and joins the
 *    thread (GIL released) and releases the view; call it before closing
 *    the segment. The doorbell descriptor is the announcer's own (a dup,
 *    closed by `close()`). Only the first `close()` stops; a concurrent
 *    second one returns at once.
 *  - In a child forked from the guest the announcer is inert (a fork
 *    generation bumped by a pthread_atfork child handler): the child
 *    shares the parent's timerfd and has no timer thread, so it never
 *    touches the timer, announces nothing (AWAKE / -1), and its `close()`
 *    joins nothing and closes only its own copies of the descriptors.
 *    spec: shm.wakeup.guest-announce
 *  - Offsets are checked (in range, 4-byte aligned) at construction; the
 *    values read from shared memory are only tested for zero.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

/* IDLE: nothing unannounced; PENDING: deferred answers, no timer yet (the
 * main thread will announce or arm before it runs anything); ARMED: the
 * timer runs; STOP: closed. */
enum { ST_IDLE = 0, ST_ARMED = 1, ST_STOP = 2, ST_PENDING = 3 };
/* announce() results */
enum { A_AWAKE = 0, A_RANG = 1, A_COALESCED = 2, A_PEER_GONE = 3, A_POLLING = 4 };

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int have_view;
    _Atomic uint32_t *sleeping;
    _Atomic uint32_t *polling;
    int fd;
    uint64_t bound_ns;
    _Atomic uint32_t state;
    _Atomic uint64_t since;
    int tfd; /* the timer: a timerfd the timer thread blocks on */
    pthread_t thread;
    int thread_started;
    uint64_t fork_gen;      /* fork_generation when made: differs in a fork child */
    _Atomic int closing;    /* the first close() joins; later ones return */
    /* statistics */
    _Atomic uint64_t deferred, armed, announces, rings, timer_announces, timer_rings, coalesced;
} Announcer;

/* Bumped in every fork child (pthread_atfork). A child shares the
 * parent's timerfd (the same open file description: arming or disarming it
 * there would disarm the parent's timer) and has no timer thread, so an
 * announcer made before the fork is inert in the child: it touches neither,
 * and announces nothing (a child does not publish into the parent's ring). */
static _Atomic uint64_t fork_generation;

static void
in_fork_child(void)
{
    atomic_fetch_add(&fork_generation, 1);
}

static inline int
forked(Announcer *a)
{
    return a->fork_gen != atomic_load_explicit(&fork_generation, memory_order_relaxed);
}

static uint64_t
mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The announcement itself (any thread, no GIL). */
static int
do_announce(Announcer *a, int by_timer)
{
    atomic_fetch_add_explicit(&a->announces, 1, memory_order_relaxed);
    if (by_timer)
        atomic_fetch_add_explicit(&a->timer_announces, 1, memory_order_relaxed);
    /* spec: shm.wakeup.sleeping-word -- RMWs, after our head stores. */
    if (!atomic_fetch_or(a->sleeping, 0))
        return A_AWAKE;
    if (a->fd < 0)
        return A_AWAKE; /* no doorbell: the host polls on a tick */
    /* spec: shm.wakeup.host-polling */
    if (atomic_fetch_or(a->polling, 0))
        return A_POLLING;
    for (;;) {
        ssize_t n = send(a->fd, "\x01", 1, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n == 1) {
            atomic_fetch_add_explicit(&a->rings, 1, memory_order_relaxed);
            if (by_timer)
                atomic_fetch_add_explicit(&a->timer_rings, 1, memory_order_relaxed);
            return A_RANG;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            atomic_fetch_add_explicit(&a->coalesced, 1, memory_order_relaxed);
            return A_COALESCED; /* a wakeup is already pending */
        }
        return A_PEER_GONE; /* EPIPE, ECONNRESET, EBADF: the hang-up tells the rest */
    }
}

static void
set_timer(Announcer *a, uint64_t deadline_ns)
{
    /* 0 disarms. Cannot fail with a valid fd and value. */
    struct itimerspec its = {{0, 0}, {(time_t)(deadline_ns / 1000000000ull),
                                      (long)(deadline_ns % 1000000000ull)}};
    timerfd_settime(a->tfd, TFD_TIMER_ABSTIME, &its, NULL);
}

/* The timer thread: blocks on the timerfd, which the main thread arms at
 * the first deferred answer (a syscall, no wake-up of this thread) and
 * disarms when it announces itself. */
static void *
timer_main(void *arg)
{
    Announcer *a = (Announcer *)arg;
    for (;;) {
        uint64_t expirations;
        ssize_t n = read(a->tfd, &expirations, sizeof expirations);
        uint32_t s = atomic_load(&a->state);
        if (s == ST_STOP)
            break;
        if (n < 0 && errno != EINTR && errno != EAGAIN)
            break; /* (the fd is ours until close: cannot happen) */
        if (s != ST_ARMED)
            continue;
        uint64_t deadline = atomic_load(&a->since) + a->bound_ns;
        if (mono_ns() < deadline) {
            set_timer(a, deadline); /* re-armed since: wait for the newer deadline */
            /* stop() may have fired the timer between our load of the state
             * and this re-arm, which replaced its wake-up: look again. */
            if (atomic_load(&a->state) == ST_STOP)
                break;
            continue;
        }
        uint32_t expected = ST_ARMED;
        if (atomic_compare_exchange_strong(&a->state, &expected, ST_IDLE))
            do_announce(a, 1);
    }
    return NULL;
}

static PyObject *
Announcer_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    Announcer *a = (Announcer *)type->tp_alloc(type, 0);
    if (a != NULL) {
        a->tfd = -1;
        a->fd = -1;
        atomic_store(&a->state, ST_STOP); /* until initialised */
    }
    return (PyObject *)a;
}

static int
offset_ok(Py_buffer *v, Py_ssize_t off, const char *what)
{
    if (off < 0 || off > v->len - 4 || ((uintptr_t)((char *)v->buf + off)) % 4) {
        PyErr_Format(PyExc_ValueError, "%s offset %zd is not a 4-byte aligned word "
                     "inside the %zd-byte buffer", what, off, v->len);
        return 0;
    }
    return 1;
}

/* Only the first caller stops: a second close() (another thread, while the
 * first waits in pthread_join with the GIL released) returns at once and
 * must not close the fds or release the view under the timer thread. In a
 * fork child there is no thread to join: only the child's copies of the
 * fds are closed (that does not touch the parent's timer). */
static void
stop(Announcer *a)
{
    if (atomic_exchange(&a->closing, 1))
        return;
    if (a->thread_started) {
        a->thread_started = 0;
        if (!forked(a)) {
            atomic_store(&a->state, ST_STOP);
            set_timer(a, 1); /* (long past: it fires at once) */
            Py_BEGIN_ALLOW_THREADS
            pthread_join(a->thread, NULL);
            Py_END_ALLOW_THREADS
        }
    }
    atomic_store(&a->state, ST_STOP);
    if (a->tfd >= 0) {
        close(a->tfd);
        a->tfd = -1;
    }
    if (a->fd >= 0) {
        close(a->fd);
        a->fd = -1;
    }
    if (a->have_view) {
        a->have_view = 0;
        PyBuffer_Release(&a->view);
    }
}

static int
Announcer_init(Announcer *a, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"buf", "sleeping_off", "polling_off", "fd", "bound_ns", NULL};
    PyObject *buf;
    Py_ssize_t soff, poff;
    int fd;
    unsigned long long bound;
    if (a->have_view || atomic_load(&a->closing)) {
        PyErr_SetString(PyExc_RuntimeError, "Announcer already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OnniK", kwlist, &buf, &soff, &poff, &fd, &bound))
        return -1;
    if (PyObject_GetBuffer(buf, &a->view, PyBUF_WRITABLE) < 0) {
        if (PyErr_ExceptionMatches(PyExc_BufferError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "expected a writable buffer, got %.100s",
                         Py_TYPE(buf)->tp_name);
        }
        return -1;
    }
    a->have_view = 1;
    if (!offset_ok(&a->view, soff, "sleeping") || !offset_ok(&a->view, poff, "polling"))
        goto fail;
    if (bound == 0 || bound > 10ull * 1000000000ull) {
        PyErr_SetString(PyExc_ValueError, "bound_ns must be in (0, 10 s]");
        goto fail;
    }
    a->sleeping = (_Atomic uint32_t *)((char *)a->view.buf + soff);
    a->polling = (_Atomic uint32_t *)((char *)a->view.buf + poff);
    a->bound_ns = bound;
    a->fork_gen = atomic_load(&fork_generation);
    /* Our own descriptor of the doorbell: the caller may close its socket
     * while the timer thread still rings (closed in stop()). */
    if (fd >= 0) {
        a->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
        if (a->fd < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
    }
    a->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
    if (a->tfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    /* The timer thread must not take process-directed signals (the main
     * thread handles them): block all in it. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&a->thread, NULL, timer_main, a);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    a->thread_started = 1;
    atomic_store(&a->state, ST_IDLE);
    return 0;
fail:
    stop(a); /* (no thread yet: closes the timerfd, releases the view) */
    return -1;
}

static void
Announcer_dealloc(Announcer *a)
{
    stop(a);
    Py_TYPE(a)->tp_free((PyObject *)a);
}

static int
closed(Announcer *a)
{
    if (!a->have_view) {
        PyErr_SetString(PyExc_ValueError, "the announcer is closed");
        return 1;
    }
    return 0;
}

static PyObject *
Announcer_defer(Announcer *a, PyObject *unused)
{
    /* A read-modify-write, sequentially consistent: a full barrier after the
     * caller's head store, so an announcement by the timer thread that this
     * answer rides on (state ARMED below) comes after it. */
    if (forked(a))
        Py_RETURN_NONE;
    atomic_fetch_add(&a->deferred, 1);
    if (atomic_load(&a->state) != ST_IDLE)
        Py_RETURN_NONE; /* armed already (or closed: nothing to time) */
    if (closed(a))
        return NULL;
    /* A host that is awake sees this answer when it re-checks the rings
     * before it sleeps (spec: shm.wakeup.sleeping-word), and a host thread
     * polling this ring sees it too: nothing to time. */
    if (a->fd < 0 || !atomic_fetch_or(a->sleeping, 0) || atomic_fetch_or(a->polling, 0))
        Py_RETURN_NONE;
    /* Only the thread holding the GIL moves IDLE -> PENDING -> ARMED. */
    atomic_store(&a->since, mono_ns());
    atomic_store(&a->state, ST_PENDING);
    Py_RETURN_NONE;
}

static PyObject *
Announcer_busy(Announcer *a, PyObject *unused)
{
    if (forked(a) || atomic_load(&a->state) != ST_PENDING)
        Py_RETURN_NONE;
    uint64_t deadline = atomic_load(&a->since) + a->bound_ns;
    if (mono_ns() >= deadline) {
        atomic_store(&a->state, ST_IDLE);
        do_announce(a, 0);
        Py_RETURN_NONE;
    }
    atomic_store(&a->state, ST_ARMED);
    atomic_fetch_add_explicit(&a->armed, 1, memory_order_relaxed);
    set_timer(a, deadline);
    Py_RETURN_NONE;
}

/* PENDING or ARMED -> IDLE (the timer stopped); 0 if nothing was unannounced. */
static int
disarm(Announcer *a)
{
    if (forked(a))
        return 0;
    uint32_t expected = ST_PENDING;
    if (atomic_compare_exchange_strong(&a->state, &expected, ST_IDLE))
        return 1;
    expected = ST_ARMED;
    if (atomic_compare_exchange_strong(&a->state, &expected, ST_IDLE)) {
        set_timer(a, 0);
        return 1;
    }
    return 0;
}

static PyObject *
Announcer_announce(Announcer *a, PyObject *unused)
{
    if (closed(a))
        return NULL;
    if (forked(a))
        return PyLong_FromLong(A_AWAKE);
    disarm(a);
    return PyLong_FromLong(do_announce(a, 0));
}

static PyObject *
Announcer_flush(Announcer *a, PyObject *unused)
{
    /* Announce only if something deferred is unannounced. */
    if (!disarm(a))
        return PyLong_FromLong(-1);
    return PyLong_FromLong(do_announce(a, 0));
}

static PyObject *
Announcer_close(Announcer *a, PyObject *unused)
{
    stop(a);
    Py_RETURN_NONE;
}

static PyObject *
Announcer_pending(Announcer *a, void *unused)
{
    uint32_t s = atomic_load(&a->state);
    return PyBool_FromLong(!forked(a) && (s == ST_ARMED || s == ST_PENDING));
}

static PyObject *
Announcer_statistics(Announcer *a, PyObject *unused)
{
    return Py_BuildValue(
        "{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}",
        "deferred", (unsigned long long)atomic_load(&a->deferred),
        "armed", (unsigned long long)atomic_load(&a->armed),
        "announces", (unsigned long long)atomic_load(&a->announces),
        "rings", (unsigned long long)atomic_load(&a->rings),
        "timer_announces", (unsigned long long)atomic_load(&a->timer_announces),
        "timer_rings", (unsigned long long)atomic_load(&a->timer_rings),
        "coalesced", (unsigned long long)atomic_load(&a->coalesced),
        "bound_ns", (unsigned long long)a->bound_ns);
}

static PyMethodDef Announcer_methods[] = {
    {"defer", (PyCFunction)Announcer_defer, METH_NOARGS,
     "defer(): an answer was published unannounced (and the host sleeps): "
     "announce()/flush() or the timer started by busy() rings for it."},
    {"busy", (PyCFunction)Announcer_busy, METH_NOARGS,
     "busy(): the caller is about to run something of unbounded length: "
     "start the timer for what is deferred (or announce now if it is due)."},
    {"announce", (PyCFunction)Announcer_announce, METH_NOARGS,
     "announce() -> int: disarm, then check the host-sleeping word (and the "
     "host-polling flag) and ring the doorbell if the host sleeps."},
    {"flush", (PyCFunction)Announcer_flush, METH_NOARGS,
     "flush() -> int: announce() if something deferred is unannounced, else -1."},
    {"close", (PyCFunction)Announcer_close, METH_NOARGS,
     "close(): stop and join the timer thread, release the buffer. Idempotent."},
    {"statistics", (PyCFunction)Announcer_statistics, METH_NOARGS,
     "statistics() -> dict of counters."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Announcer_getset[] = {
    {"pending", (getter)Announcer_pending, NULL,
     "True while a deferred answer is unannounced.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject AnnouncerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmpool._guestloop.Announcer",
    .tp_basicsize = sizeof(Announcer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Announcer(buf, sleeping_off, polling_off, fd, bound_ns): see the module docstring.",
    .tp_new = Announcer_new,
    .tp_init = (initproc)Announcer_init,
    .tp_dealloc = (destructor)Announcer_dealloc,
    .tp_methods = Announcer_methods,
    .tp_getset = Announcer_getset,
};

static int
exec_module(PyObject *m)
{
    if (PyType_Ready(&AnnouncerType) < 0)
        return -1;
    static int atfork_done;
    if (!atfork_done) {
        int rc = pthread_atfork(NULL, NULL, in_fork_child);
        if (rc != 0) {
            errno = rc;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        atfork_done = 1;
    }
    Py_INCREF(&AnnouncerType);
    if (PyModule_AddObject(m, "Announcer", (PyObject *)&AnnouncerType) < 0) {
        Py_DECREF(&AnnouncerType);
        return -1;
    }
    if (PyModule_AddIntConstant(m, "AWAKE", A_AWAKE) < 0 ||
        PyModule_AddIntConstant(m, "RANG", A_RANG) < 0 ||
        PyModule_AddIntConstant(m, "COALESCED", A_COALESCED) < 0 ||
        PyModule_AddIntConstant(m, "PEER_GONE", A_PEER_GONE) < 0 ||
        PyModule_AddIntConstant(m, "POLLING", A_POLLING) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmpool._guestloop",
    .m_doc = "A guest's announcements of what it published, with a bounded timer (shmpool layer 0).",
    .m_size = 0,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__guestloop(void)
{
    return PyModuleDef_Init(&moduledef);
}
