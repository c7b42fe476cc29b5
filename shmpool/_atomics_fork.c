/* The runtime's main thread state in a fork() child of another thread
 * (part of the _atomics extension; its one caller is fork_child, in
 * _atomics.c, spec: exec.fork-signals).
 *
 * CPython runs a Python signal handler when the main thread's evaluation
 * loop sees the "signals pending" bit, which the C-level handler sets in
 * the thread state the runtime records as the main thread's
 * (_PyRuntime.main_tstate, 3.13 on; before, the bit was the
 * interpreter's). After fork() from a thread other than the main one,
 * the child's only thread becomes its main thread (_PyRuntime.main_thread
 * is its id) but main_tstate still names the parent's main thread state,
 * which no thread of the child runs: the bit goes there, and the child
 * runs its handlers only where a C call checks for signals itself (a
 * system call interrupted by one: a sleep, a lock's wait). A worker that
 * runs Python code when its stop signal or a Ctrl-C comes would never be
 * stopped. The hub forks its guests from its driver thread, so the child
 * makes its own thread state the main one, as a process started anew has
 * it. (CPython 3.13.0 does not do it in PyOS_AfterFork_Child; where a
 * later one does, this finds it done.)
 *
 * Its own translation unit: it needs the runtime's internal structure
 * (Py_BUILD_CORE), which the rest of the module must not be built with.
 * main_tstate is in the part of _PyRuntimeState that CPython keeps early
 * and stable for out-of-process tools. */

#include <Python.h>

#if PY_VERSION_HEX >= 0x030D0000 && !defined(PYPY_VERSION)
#  ifndef Py_BUILD_CORE
#    define Py_BUILD_CORE 1
#  endif
#  include "internal/pycore_runtime.h"
#  define SHMPOOL_MAIN_TSTATE 1
#endif

/* In the child, right after PyOS_AfterFork_Child (the thread holds the
 * GIL, and blocks the asynchronous signals: none can be tripped before
 * this). Returns 1 if the runtime named another thread state, else 0. */
int
shmpool_adopt_main_tstate(void)
{
#ifdef SHMPOOL_MAIN_TSTATE
    PyThreadState *ts = PyThreadState_Get();
    if (_PyRuntime.main_tstate != ts) {
        _PyRuntime.main_tstate = ts;
        return 1;
    }
#endif
    return 0;
}
