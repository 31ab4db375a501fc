"""Pure tests (no tracee): the recorder's drain against a ring whose header or file the tracee
damaged, and the stack scan for return addresses and signal-frame saved pcs."""
from __future__ import annotations

import os
import struct

import pytest

from tracer import stackscan
from tracer.errors import MemoryReadError
from tracer.inject import CallStats, _FileRing
from tracer.inject import layout as L

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 only")


def _ring():  # type: ignore[no-untyped-def]
    from test_inject_speed import _full_ring
    return _full_ring(lambda i: 2, lambda i: 0)


def _set(rec, off: int, value: int) -> None:  # type: ignore[no-untyped-def]
    rec._ring[off:off + 8] = value.to_bytes(8, "little")


def test_head_past_what_a_stub_can_claim_is_followed_once() -> None:
    rec = _ring()
    _set(rec, L.HEAD, 10 * L.NSLOTS)                 # tail 0: no stub claims past NSLOTS
    assert rec.drain() == []
    assert rec.header_corrupt() == 1 and not rec.ring_broken()
    assert int.from_bytes(rec._ring[L.TAIL:L.TAIL + 8], "little") == 10 * L.NSLOTS
    assert rec.drain() == []                         # nothing new: no more counting
    assert rec.header_corrupt() == 1


def test_head_behind_tail_is_followed() -> None:
    rec = _ring()
    stats: dict[str, CallStats] = {}
    assert rec.drain_stats(stats) == L.NSLOTS
    _set(rec, L.HEAD, 5)
    assert rec.drain_stats(stats) == 0
    assert rec.header_corrupt() == 1 and rec._tail == 5


def test_head_near_2_63_stops_reading_the_ring_in_bounded_work() -> None:
    rec = _ring()
    _set(rec, L.HEAD, (1 << 63) + 12345)
    stats: dict[str, CallStats] = {}
    for _ in range(3):
        assert rec.drain_stats(stats) == 0 and rec.drain() == []
    assert rec.ring_broken() and rec.header_corrupt() == 1


def test_uncommitted_slots_are_corrupt_at_once_when_no_stub_can_commit() -> None:
    rec = _ring()
    for i in range(10, 20):                          # claimed, never committed
        _set(rec, L.DATA + i * L.SLOT + L.S_SEQ, 0)
    assert len(rec.drain()) == 10                    # waits at slot 10 (a stub may be late)
    rec.producers_stopped()
    assert len(rec.drain()) == L.NSLOTS - 20
    assert rec.corrupt() == 10


def test_lost_counter_beyond_what_the_process_can_count_is_not_believed() -> None:
    rec = _ring()
    _set(rec, L.LOST, 7)
    assert rec.lost() == 7 and rec.lost_counter_corrupt() is None
    _set(rec, L.LOST, 15038334544005518715)
    assert rec.lost() == 7
    assert rec.lost_counter_corrupt() == 15038334544005518715


def test_lost_counter_going_back_is_not_believed() -> None:
    rec = _ring()
    _set(rec, L.LOST, 100)
    assert rec.lost() == 100
    _set(rec, L.LOST, 3)
    assert rec.lost() == 100 and rec.lost_counter_corrupt() == 3


def test_a_short_ring_file_is_not_a_fault() -> None:
    rec = _ring()
    fd = os.memfd_create("ring-test")
    try:
        os.ftruncate(fd, L.RING_SIZE)
        os.pwrite(fd, bytes(rec._ring[0:L.RING_SIZE]), 0)
        rec._ring = _FileRing(fd)
        assert len(rec.drain(100)) == 100
        os.ftruncate(fd, 4096)                       # what a sealed memfd refuses
        assert rec.drain() == []
        assert rec.ring_broken()
    finally:
        os.close(fd)


# ------------------------------------------------------------------ stackscan

class _Mem:
    def __init__(self, base: int, data: bytes) -> None:
        self.base, self.data = base, data

    def read(self, addr: int, size: int) -> bytes:
        off = addr - self.base
        if off < 0 or off + size > len(self.data):
            raise MemoryReadError(addr, size, "unmapped")
        return self.data[off:off + size]


CODE = (0x7F0000001000, 0x7F0000005000)


def _stack64(words: list[int]) -> _Mem:
    return _Mem(0x7FFD00000000, struct.pack(f"<{len(words)}Q", *words) + bytes(8192))


def test_scan_finds_a_saved_pc_by_its_context() -> None:
    pc = CODE[0] + 0x123
    # sigcontext_64: ..., sp, ip, flags (bit 1 set), cs|gs|fs|ss
    words = [0, 0, 0x7FFD00001000, pc, 0x246, 0x33 | (0x2B << 48), 0]
    hits = stackscan.scan(_stack64(words).read, 0x7FFD00000000, 8, [CODE], lambda v: False)
    assert [(h.value, h.signal) for h in hits] == [(pc, True)]


def test_scan_ignores_words_that_are_neither() -> None:
    pc = CODE[0] + 0x123
    words = [pc, 0x246, 0x2B, pc, 0x12345678, 0x33]   # wrong cs; flags with high bits
    hits = stackscan.scan(_stack64(words).read, 0x7FFD00000000, 8, [CODE], lambda v: False)
    assert hits == []


def test_scan_finds_return_addresses_it_is_told_of() -> None:
    ret = CODE[0] + 0x40
    words = [1, 2, ret, 3]
    hits = stackscan.scan(_stack64(words).read, 0x7FFD00000000, 8, [CODE], {ret}.__contains__)
    assert [(h.at, h.value, h.signal) for h in hits] == [(0x7FFD00000010, ret, False)]


def test_scan_i386_saved_pc() -> None:
    code = (0xF7F00000, 0xF7F04000)
    pc = code[0] + 0x10
    # sigcontext_32: ..., ip, cs (u16) + __csh, flags
    raw = struct.pack("<6I", 0, 0, pc, 0x23, 0x10246 & 0x3FFFFF, 0) + bytes(4096)
    hits = stackscan.scan(_Mem(0xFFB00000, raw).read, 0xFFB00000, 4, [code], lambda v: False)
    assert [(h.value, h.signal) for h in hits] == [(pc, True)]
