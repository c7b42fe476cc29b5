"""Crash-safe lock-free free list (Treiber stack) of one size class.

Owns: the `free_head` word of a class header and the `status`/`next_free`
words of the slots on the list. No process ever holds a lock here, and a
process killed at any instruction leaves the list consistent and every
slot either on the list or attributable to an owner.

Data flow. The head packs (tag, pending op, op peer, top slot + 1). Every
successful update bumps the tag, so a stale compare-exchange fails (ABA).
Both operations are two-phase, and the first phase is published in the
head itself so that any process can finish it:

- pop:  CAS head (T, top)            -> (T+1, top, POP by me)   "claimed"
        status FREE(g_old)           -> ALLOCATED(T+1, owner me)
        CAS head (T+1, top, POP)     -> (T+2, next)
- push: status ALLOCATED/IN_FLIGHT   -> FREEING(g, owner me)
        next_free := top;  CAS head (T, top) -> (T+1, me, PUSH by me) "linked"
        status FREEING(g)            -> FREE(g)
        CAS head (T+1, me, PUSH)     -> (T+2, me)

While an operation is pending, every other operation on the class first
completes it ("helping"), so a process that dies after its first phase
never blocks anyone, and its claimed slot ends ALLOCATED to it (then
`reclaim` frees it) while its pushed slot ends FREE. A slot a dead process
marked FREEING but never linked is found by `reclaim` the same way.

Invariants:
- A slot is reachable from the head only while its status is FREE, or
  FREEING with a pending PUSH of it, or FREE/ALLOCATED with a pending POP
  of it.
- The generation a slot gets is the tag of the claim that popped it;
  tags only rise, so generations only rise (modulo 2**29).
- A helper reads the slot's status and then checks that the head still
  holds the pending operation; only then does it compare-exchange from the
  value it read. That value was read while the operation was pending, and
  every later cycle of the slot carries a new generation, so a helper that
  stalls and wakes late can never change a later cycle's status.

Guarding (the list is shared by every process, so garbage in it cannot be
blamed on one): every head value and next-free link is checked before it
is followed (a known operation, a top that names an existing slot, the
status of a slot being popped Free or already claimed by that pop: a link
into a cycle meets a slot in use), and
every loop is bounded (CAS retries by RETRY_LIMIT, walks by the number of
slots the class can have). A violation raises SegmentCorruptError naming
what was found; the slot pool then refuses further use.
spec: shm.guard.bounded
"""

from __future__ import annotations

from .. import _atomics, errors, failpoints
from ..errors import StatusMismatch
from . import layout as L

load_u32 = _atomics.load_u32
load_u64 = _atomics.load_u64
store_u32 = _atomics.store_u32
store_u64 = _atomics.store_u64
cas_u64 = _atomics.cas_u64

_TOP = L.HEAD_TOP_MASK
_TAG_SHIFT = L.HEAD_TAG_SHIFT
_TAG_MASK = L.HEAD_TAG_MASK
_OP_SHIFT = L.HEAD_OP_SHIFT
_PEER_SHIFT = L.HEAD_PEER_SHIFT
# Compare-exchange retries (lost races, helping) one operation may take.
# Honest contention between a few hundred processes ends long before; a
# head that keeps changing into states nobody can finish is garbage.
RETRY_LIMIT = 1 << 20

FP_POP_READ = failpoints.declare("varslot.pop.read-head", "head read, claim not yet attempted")
FP_POP_CLAIMED = failpoints.declare("varslot.pop.claimed", "head claimed, slot meta not yet written")
FP_POP_META = failpoints.declare("varslot.pop.meta-written", "slot ALLOCATED, head not yet advanced")
FP_PUSH_FREEING = failpoints.declare("varslot.push.freeing", "slot FREEING, not yet linked")
FP_PUSH_LINKED = failpoints.declare("varslot.push.linked", "slot linked, meta not yet FREE")
FP_PUSH_FINAL = failpoints.declare("varslot.push.meta-free", "slot FREE, head op not yet cleared")


class FreeList:
    """The free list of one class, as seen by one process (peer `me`).

    `meta(number)` maps a slot number to (buffer, offset of its SlotMeta);
    it must resolve every slot that can be on the list, and raise
    SegmentCorruptError for a number (read from the head or a link) that
    names no slot.
    """

    __slots__ = ("buf", "head", "me", "meta", "limit", "pops", "pushes", "helps", "cas_retries")

    def __init__(self, buf, head_off: int, me: int, meta, limit: int = L.MAX_EXTENTS * L.MAX_SLOTS_PER_EXTENT) -> None:
        self.buf = buf
        self.head = head_off
        self.me = me
        self.meta = meta  # raises SegmentCorruptError for a number that names no slot
        self.limit = limit  # slots the class can ever have: bounds a walk of the list
        self.pops = self.pushes = self.helps = self.cas_retries = 0

    def _corrupt(self, what: str) -> errors.SegmentCorruptError:
        return errors.SegmentCorruptError(f"the free list at offset {self.head} {what}")


    # -- pop ------------------------------------------------------------------

    def pop(self) -> tuple[int, int] | None:
        """Take the first free slot: (slot number, generation), or None if
        the list is empty. spec: shm.varslot.allocation"""
        buf, head = self.buf, self.head
        retries = 0  # (counted on the retry paths only: the fast path stays as it was)
        while True:
            h = load_u64(buf, head)
            if (h >> _OP_SHIFT) & 3:
                retries = self._retry(retries, "pop")
                self.help(h)
                continue
            top = h & _TOP
            if not top:
                return None
            gen = ((h >> _TAG_SHIFT) + 1) & _TAG_MASK
            claim = (gen << _TAG_SHIFT) | (L.OP_POP << _OP_SHIFT) | (self.me << _PEER_SHIFT) | top
            if failpoints.ACTIVE:
                failpoints.hit(FP_POP_READ)
            if cas_u64(buf, head, h, claim) != h:
                self.cas_retries += 1
                retries = self._retry(retries, "pop")
                continue
            if failpoints.ACTIVE:
                failpoints.hit(FP_POP_CLAIMED)
            self._finish_pop(claim)
            self.pops += 1
            return top - 1, gen

    def _retry(self, retries: int, what: str) -> int:
        """spec: shm.guard.bounded -- one more retry of an operation."""
        if retries >= RETRY_LIMIT:
            raise self._corrupt(f"changed {RETRY_LIMIT} times under one {what} (never settles)")
        return retries + 1

    def _finish_pop(self, h: int) -> None:
        top = h & _TOP
        gen = (h >> _TAG_SHIFT) & _TAG_MASK
        peer = (h >> _PEER_SHIFT) & 0xFF
        mbuf, moff = self.meta(top - 1)
        nxt = load_u32(mbuf, moff + L.M_NEXT_FREE)
        s0 = load_u64(mbuf, moff)
        if load_u64(self.buf, self.head) != h:
            return  # completed by someone else; what we read may be newer
        # s0 was read while the claim was pending: FREE means the meta write
        # is still to do. spec: shm.varslot.allocation
        claimed = (gen << 32) | (peer << 8) | L.ALLOCATED
        if (s0 & 0xFF) == L.FREE:
            cas_u64(mbuf, moff, s0, claimed)
        elif s0 != claimed:  # spec: shm.guard.validate -- a slot in use is on the list
            raise self._corrupt(f"has slot {top - 1} on it with status {s0:#x}, neither Free "
                                f"nor claimed by this pop ({claimed:#x})")
        if failpoints.ACTIVE:
            failpoints.hit(FP_POP_META)
        cas_u64(self.buf, self.head, h, (((gen + 1) & _TAG_MASK) << _TAG_SHIFT) | nxt)

    # -- push -----------------------------------------------------------------

    def push(self, number: int, expected: int) -> None:
        """Free slot `number` whose status is `expected` (ALLOCATED or
        IN_FLIGHT, owned by the caller, or FREEING left by a dead peer).
        Raises StatusMismatch, changing nothing, if the status differs.
        spec: shm.varslot.freeing"""
        buf, head, me = self.buf, self.head, self.me
        mbuf, moff = self.meta(number)
        freeing = ((expected >> 32) << 32) | (me << 8) | L.FREEING
        if expected != freeing:  # (a dead peer's FREEING slot is already there)
            seen = cas_u64(mbuf, moff, expected, freeing)  # proves ownership
            if seen != expected:
                raise StatusMismatch(seen)
        if failpoints.ACTIVE:
            failpoints.hit(FP_PUSH_FREEING)
        retries = 0
        while True:
            h = load_u64(buf, head)
            if (h >> _OP_SHIFT) & 3:
                retries = self._retry(retries, "push")
                self.help(h)
                continue
            tag = ((h >> _TAG_SHIFT) + 1) & _TAG_MASK
            store_u32(mbuf, moff + L.M_NEXT_FREE, h & _TOP)
            linked = (tag << _TAG_SHIFT) | (L.OP_PUSH << _OP_SHIFT) | (me << _PEER_SHIFT) | (number + 1)
            if cas_u64(buf, head, h, linked) == h:
                break
            self.cas_retries += 1
            retries = self._retry(retries, "push")
        if failpoints.ACTIVE:
            failpoints.hit(FP_PUSH_LINKED)
        self._finish_push(linked)
        self.pushes += 1

    def push_fresh(self, first: int, count: int, mbuf, meta0: int, expected: int, progress: list) -> None:
        """Free slots `first`, `first + 1`, ... (`count` of them, whose
        metas are consecutive in `mbuf` from `meta0`, each with status
        `expected`): a grower's new extent. Each slot is one `push`, step
        for step (the same states and failpoints: a grower killed between
        two leaves the rest Allocated to itself), only without the per-call
        lookups; `progress[0]` counts the slots done (an interruption's
        caller finishes the rest). spec: shm.varslot.freeing"""
        buf, head, me = self.buf, self.head, self.me
        freeing = ((expected >> 32) << 32) | (me << 8) | L.FREEING
        free_ = (expected >> 32) << 32 | L.FREE
        size, nxt_off = L.SLOT_META_SIZE, L.M_NEXT_FREE
        push_bits = (L.OP_PUSH << _OP_SHIFT) | (me << _PEER_SHIFT)
        fp = failpoints.ACTIVE
        for i in range(count):
            moff = meta0 + i * size
            number = first + i
            seen = cas_u64(mbuf, moff, expected, freeing)  # proves ownership
            if seen != expected:
                raise StatusMismatch(seen)
            if fp:
                failpoints.hit(FP_PUSH_FREEING)
            retries = 0
            while True:
                h = load_u64(buf, head)
                if (h >> _OP_SHIFT) & 3:
                    retries = self._retry(retries, "push")
                    self.help(h)
                    continue
                tag = ((h >> _TAG_SHIFT) + 1) & _TAG_MASK
                store_u32(mbuf, moff + nxt_off, h & _TOP)
                linked = (tag << _TAG_SHIFT) | push_bits | (number + 1)
                if cas_u64(buf, head, h, linked) == h:
                    break
                self.cas_retries += 1
                retries = self._retry(retries, "push")
            if fp:
                failpoints.hit(FP_PUSH_LINKED)
            # (`_finish_push(linked)`, inline)
            s0 = load_u64(mbuf, moff)
            if load_u64(buf, head) == linked:
                if (s0 & 0xFF) == L.FREEING:
                    cas_u64(mbuf, moff, s0, free_)
                if fp:
                    failpoints.hit(FP_PUSH_FINAL)
                cas_u64(buf, head, linked, (((tag + 1) & _TAG_MASK) << _TAG_SHIFT) | (number + 1))
            self.pushes += 1
            progress[0] = i + 1
            if i == 0 and fp:
                progress[1]()

    def _finish_push(self, h: int) -> None:
        top = h & _TOP
        tag = (h >> _TAG_SHIFT) & _TAG_MASK
        mbuf, moff = self.meta(top - 1)
        s0 = load_u64(mbuf, moff)
        if load_u64(self.buf, self.head) != h:
            return  # completed by someone else
        if (s0 & 0xFF) == L.FREEING:
            cas_u64(mbuf, moff, s0, (s0 >> 32) << 32 | L.FREE)
        if failpoints.ACTIVE:
            failpoints.hit(FP_PUSH_FINAL)
        cas_u64(self.buf, self.head, h, (((tag + 1) & _TAG_MASK) << _TAG_SHIFT) | top)

    # -- recovery --------------------------------------------------------------

    def help(self, h: int) -> None:
        """Complete the pending operation recorded in head value `h`."""
        self.helps += 1
        op = (h >> _OP_SHIFT) & 3
        if op == L.OP_POP:
            self._finish_pop(h)
        elif op == L.OP_PUSH:
            self._finish_push(h)
        else:  # spec: shm.guard.validate -- nobody could ever finish it
            raise self._corrupt(f"holds head {h:#x}, whose pending operation is unknown")

    def settle(self) -> None:
        """Complete whatever operation is pending (used before reclaim)."""
        for _ in range(RETRY_LIMIT):  # spec: shm.guard.bounded
            h = load_u64(self.buf, self.head)
            if not (h >> _OP_SHIFT) & 3:
                return
            self.help(h)
        raise self._corrupt(f"changed {RETRY_LIMIT} times while being settled")

    def length(self) -> int:
        """Slots on the list (walks it; exact only when nobody is changing it)."""
        self.settle()
        n = 0
        top = load_u64(self.buf, self.head) & _TOP
        while top:
            n += 1
            if n > self.limit:  # spec: shm.guard.bounded
                raise self._corrupt(f"is longer than the {self.limit} slots its class can have (a cycle)")
            mbuf, moff = self.meta(top - 1)
            top = load_u32(mbuf, moff + L.M_NEXT_FREE)
        return n
