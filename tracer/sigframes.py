"""Signal frames on a stopped thread's stack: where a signal handler interrupted it.

A thread whose pc lies outside the vDSO and vdsotrace's code can only come back into that
code by returning through a frame that is still live. The vDSO's functions call nothing
outside the vDSO (their fallbacks are system calls), so a call into them that is still in
flight while the thread runs elsewhere means a signal handler interrupted it: the kernel
saved the interrupted context in a signal frame above the handler's stack pointer (on the
thread's stack, or on its sigaltstack, where sp is while the handler runs). A return
address into a stub found anywhere else on such a thread's stack is a stale word of an
earlier call, left in a slot no frame uses any more.

A saved ip is told from any other word by the saved context around it (stackscan.saved_ip).
`word`: the stack's arch (tracer.arch.Arch), or its word size for old callers.
"""
from __future__ import annotations

from collections.abc import Callable

from tracer.arch import Arch
from tracer.errors import MemoryReadError
from tracer.stackscan import arch_of, scan

__all__ = ["interrupted", "SCAN_LIMIT"]

SCAN_LIMIT = 64 * 1024        # bytes above sp looked at (stopping early at unreadable memory)


def interrupted(read: Callable[[int, int], bytes], sp: int, word: int | Arch,
                spans: list[tuple[int, int]], limit: int = SCAN_LIMIT,
                pac_mask: int | None = None) -> list[tuple[int, int]]:
    """The signal frames in [sp, sp + limit) (up to unreadable memory) that saved an ip in
    one of `spans` [lo, hi): (saved ip, saved sp) each, innermost first, at most a few
    dozen. A frame found this way may be stale (left by a handler that returned).
    `pac_mask`: arm64's pointer-authentication bits (stackscan.scan)."""
    arch = arch_of(word)
    sp_back, word = arch.sigcontext_sp_back, arch.word       # the saved sp, before the ip
    frames: list[tuple[int, int]] = []
    for hit in scan(read, sp, arch, spans, lambda v: False, limit=limit, pac_mask=pac_mask):
        try:
            saved_sp = int.from_bytes(read(hit.at - sp_back, word), "little")
        except MemoryReadError:
            saved_sp = 0
        frames.append((hit.value, saved_sp))
    return frames
