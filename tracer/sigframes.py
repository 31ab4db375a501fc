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
"""
from __future__ import annotations

from collections.abc import Callable

from tracer.errors import MemoryReadError
from tracer.stackscan import saved_ip

__all__ = ["interrupted", "SCAN_LIMIT"]

SCAN_LIMIT = 64 * 1024        # bytes above sp looked at (stopping early at unreadable memory)
_PAGE = 4096
_MAX_HITS = 64


def interrupted(read: Callable[[int, int], bytes], sp: int, word: int,
                spans: list[tuple[int, int]], limit: int = SCAN_LIMIT) -> list[tuple[int, int]]:
    """The signal frames in [sp, sp + limit) (up to unreadable memory) that saved an ip in
    one of `spans` [lo, hi): (saved ip, saved sp) each, innermost first, at most a few
    dozen. A frame found this way may be stale (left by a handler that returned)."""
    spans = [(lo, hi) for lo, hi in spans if lo < hi]
    if not spans:
        return []
    top = 3 if word == 8 else 2          # the high bytes a value in a span starts with
    prefixes = {a.to_bytes(word, "little")[word - top:] for lo, hi in spans for a in (lo, hi - 1)}
    # the saved sp: sigcontext_64 has sp just before ip; sigcontext_32 has sp, bx, dx, cx,
    # ax, trapno and err between them
    sp_back = 8 if word == 8 else 28
    hits: list[tuple[int, int]] = []
    at = sp & ~(word - 1)
    end = at + limit
    while at < end and len(hits) < _MAX_HITS:
        n = min(_PAGE - (at & (_PAGE - 1)), end - at)
        try:
            chunk = read(at, n)
        except MemoryReadError:
            break
        if any(p in chunk for p in prefixes):
            for k in range(0, len(chunk) - word + 1, word):
                if chunk[k + word - top:k + word] not in prefixes:
                    continue
                v = int.from_bytes(chunk[k:k + word], "little")
                if any(lo <= v < hi for lo, hi in spans) and saved_ip(read, at + k, word):
                    try:
                        saved_sp = int.from_bytes(read(at + k - sp_back, word), "little")
                    except MemoryReadError:
                        saved_sp = 0
                    hits.append((v, saved_sp))
        at += n
    return hits
