"""The host's cache of pickled functions, for `core.Core`.

Owns: which callables are cached (plain functions, builtin functions of a
module, classes: code that cannot change under us), their ids and pickled
bytes, and the ids workers may forget.

Data flow: `Core.submit` -> `get(fn)`: (id, name, bytes) from the cache,
or pickled now and cached; for any other callable (a bound method, a
partial, a callable object) id 0 and no bytes: the core sends it with its
call. Evicted entries (least recently used beyond `size`) and entries of
collected functions -> `forgotten` -> `Scheduler.schedule` tells the workers
that hold them to drop them (with their next `define`).

Invariants: the cache holds only weak references, so it keeps no callable
(nor, through a method, its object) alive; an entry is used only for the
very object it was made for (identity checked through the weak
reference, so a reused id() never aliases); at most `size` entries.
spec: exec.functions
"""

from __future__ import annotations

import collections
import itertools
import threading
import types
import weakref

from .serialization import dumps_bytes


class FunctionCache:
    """See the module docstring. Thread-safe."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict = collections.OrderedDict()  # id(fn) -> (ref, fid, bytes, name)
        self._dead: collections.deque = collections.deque()  # weak references of collected functions
        self._refs: dict[int, tuple[int, int]] = {}  # id(weak reference) -> (id(fn), fid)
        self.forgotten: collections.deque = collections.deque()  # fids no worker needs to keep

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, fn) -> tuple[int, str, bytes | None]:
        """(id, name, pickled bytes) of `fn`; (0, name, None) if `fn` is
        not cached. Raises what pickling raises."""
        got = self._entries.get(id(fn))
        if got is not None and got[0]() is fn:  # the common case, without the lock
            try:
                self._entries.move_to_end(id(fn))
            except KeyError:  # evicted meanwhile: see below
                pass
            else:
                return got[1], got[3], got[2]
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
        if not cacheable(fn):
            return 0, name, None
        key = id(fn)
        with self._lock:
            self._prune()
            got = self._entries.get(key)
            if got is not None and got[0]() is fn:
                self._entries.move_to_end(key)
                return got[1], got[3], got[2]
        fbytes = dumps_bytes(fn)  # (not under the lock: it may take a while)
        with self._lock:
            got = self._entries.get(key)
            if got is not None and got[0]() is fn:  # another thread was quicker
                return got[1], got[3], got[2]
            fid = next(self._ids)
            # The callback is a C method: no Python code runs when a
            # function dies (a Ctrl-C landing in a weakref callback is
            # swallowed); `_prune` finds the entry by the dead reference.
            ref = weakref.ref(fn, self._dead.append)
            self._refs[id(ref)] = (key, fid)
            if got is not None:  # a collected function's entry under a reused id
                self._drop(got)
            self._entries[key] = (ref, fid, fbytes, name)
            while len(self._entries) > self.size:
                self._drop(self._entries.popitem(last=False)[1])
        return fid, name, fbytes

    def _prune(self) -> None:
        """Drop the entries of collected functions (lock held). Their weakref
        callbacks only queue them: those may run in any thread, at any
        point, even while this lock is held."""
        dead = self._dead
        while dead:
            found = self._refs.pop(id(dead.popleft()), None)
            if found is None:
                continue  # its entry was dropped already
            key, fid = found
            got = self._entries.get(key)
            if got is not None and got[1] == fid:
                del self._entries[key]
            self.forgotten.append(fid)

    def _drop(self, entry) -> None:
        """An entry leaves the cache (lock held): its id is forgotten."""
        self._refs.pop(id(entry[0]), None)
        self.forgotten.append(entry[1])

    def has_forgotten(self) -> bool:
        return bool(self.forgotten or self._dead)

    def take_forgotten(self) -> set[int]:
        with self._lock:
            self._prune()
        out = set()
        while self.forgotten:
            out.add(self.forgotten.popleft())
        return out

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._refs.clear()
            self._dead.clear()
            self.forgotten.clear()


def cacheable(fn) -> bool:
    """Code that cannot change under us: a function, a builtin function of
    a module, a class."""
    t = type(fn)
    if t is types.FunctionType or isinstance(fn, type):
        return True
    if t is types.BuiltinFunctionType:
        owner = fn.__self__
        return owner is None or isinstance(owner, types.ModuleType)
    return False
