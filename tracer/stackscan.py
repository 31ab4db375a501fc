"""Where a stopped thread may still go: the words on its stack that will become its pc.

Two kinds of word send a thread back into code once it runs again: a return address (a
`call` pushed it) and the ip saved in a signal frame (a handler interrupted the thread
there; rt_sigreturn restores it). The second is the only trace of a thread that a signal
handler interrupted inside code the tracer wrote: its pc is the handler's, its stack holds
the rest. The frame lies above the handler's sp, on the thread's stack or on its
sigaltstack, which is where sp is while the handler runs; so a scan from sp upward finds
both kinds.

A saved ip is told from any other word by the saved context around it: each arch's
`saved_context` (tracer/arch/), e.g. on x86 the user code segment selector and the flags'
reserved bits next to it.

`word` is the stack's arch (tracer.arch.Arch) or, for old callers, its word size (8: x86_64,
4: i386).

arm64: a return address saved on the stack (the x30 of a frame record) is signed by pointer
authentication in functions built with -mbranch-protection (paciasp): its top bits hold a
PAC. With `pac_mask` (the thread's NT_ARM_PAC_MASK insn_mask, Arch.pac_mask) each word is
stripped of them before it is compared with the spans, and the hit's value is the stripped
address. Without one, an arm64 stack is scanned with every bit a PAC can use on Linux
(`DEFAULT_PAC_MASK`). The ip saved in a signal frame's sigcontext is never signed.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from tracer.arch import I386, X86_64, Arch
from tracer.errors import MemoryReadError

__all__ = ["Hit", "scan", "mapping_end", "saved_ip", "arch_of", "SCAN_LIMIT", "DEFAULT_PAC_MASK"]

SCAN_LIMIT = 256 * 1024       # bytes above sp looked at (stopping early at unmapped memory)
_MAX_HITS = 64
_PAGE = 4096
_BY_WORD = {8: X86_64, 4: I386}
# arm64: the kernel's PAC mask is GENMASK(54, vabits) (arch/arm64/include/asm/
# pointer_auth.h ptrauth_user_pac_mask) with vabits 48 or 52: within bits 48-54 either way.
# Stripping all of them misreads only an address at or above 2^48 (52-bit VA and an mmap hint
# that high), never the vDSO's or the pages the tracer maps near it.
DEFAULT_PAC_MASK = {"aarch64": 0x007F000000000000}


def arch_of(word: int | Arch) -> Arch:
    """An arch given as itself or by word size (the two x86 ABIs)."""
    return word if isinstance(word, Arch) else _BY_WORD[word]


@dataclass(frozen=True, slots=True)
class Hit:
    at: int                   # runtime_addr of the word on the stack
    value: int                # the pc it holds (stripped of a pointer-authentication code)
    signal: bool              # the ip of a signal frame's saved context (else a return address)


def saved_ip(read: Callable[[int, int], bytes], at: int, word: int | Arch) -> bool:
    """Is the word at `at` the ip of a saved signal context?"""
    return arch_of(word).saved_context(read, at)


def mapping_end(ranges: list[tuple[int, int]], sp: int) -> int | None:
    """The end of the mapping [start, end) that holds sp (the top of that stack: a thread's
    frames, or a sigaltstack's, do not go past it; what lies beyond is another mapping,
    where stale words would only mislead)."""
    for lo, hi in ranges:
        if lo <= sp < hi:
            return hi
    return None


def scan(read: Callable[[int, int], bytes], sp: int, word: int | Arch,
         spans: list[tuple[int, int]], is_return: Callable[[int], bool],
         limit: int = SCAN_LIMIT, end: int | None = None,
         pac_mask: int | None = None) -> list[Hit]:
    """The words in [sp, sp + limit), and below `end` (the top of the stack, see
    mapping_end), up to unmapped memory, whose value (stripped of `pac_mask`'s bits: arm64's
    signed return addresses) lies in one of `spans` and that are either a signal frame's
    saved ip or, by `is_return`, a return address. At most a few dozen hits. `pac_mask`
    None: the arch's DEFAULT_PAC_MASK (0 where nothing is signed)."""
    spans = [(lo, hi) for lo, hi in spans if lo < hi]
    if not spans:
        return []
    arch = arch_of(word)
    if pac_mask is None:
        pac_mask = DEFAULT_PAC_MASK.get(arch.name, 0)
    if pac_mask:
        return _scan_signed(read, sp, arch, spans, is_return, limit, end, pac_mask)
    saved_context, word = arch.saved_context, arch.word
    top = 3 if word == 8 else 2          # the high bytes a value in a span starts with
    prefixes = {a.to_bytes(word, "little")[word - top:] for lo, hi in spans for a in (lo, hi - 1)}
    hits: list[Hit] = []
    at = sp & ~(word - 1)
    end = at + limit if end is None else min(at + limit, end)
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
                if not any(lo <= v < hi for lo, hi in spans):
                    continue
                sig = saved_context(read, at + k)
                if sig or is_return(v):
                    hits.append(Hit(at + k, v, sig))
        at += n
    return hits


def _scan_signed(read: Callable[[int, int], bytes], sp: int, arch: Arch,
                 spans: list[tuple[int, int]], is_return: Callable[[int], bool],
                 limit: int, end: int | None, pac_mask: int) -> list[Hit]:
    """scan() where words may carry a pointer-authentication code in their top bits: no
    byte-prefix filter (the PAC changes those bytes), every word stripped and compared."""
    from tracer.arch.aarch64 import strip_pac
    saved_context, word = arch.saved_context, arch.word
    unpack = struct.Struct("<Q" if word == 8 else "<I").iter_unpack
    lo_all, hi_all = min(lo for lo, _ in spans), max(hi for _, hi in spans)
    hits: list[Hit] = []
    at = sp & ~(word - 1)
    end = at + limit if end is None else min(at + limit, end)
    while at < end and len(hits) < _MAX_HITS:
        n = min(_PAGE - (at & (_PAGE - 1)), end - at)
        n -= n % word
        if n <= 0:
            break
        try:
            chunk = read(at, n)
        except MemoryReadError:
            break
        for k, (raw,) in enumerate(unpack(chunk[:len(chunk) - len(chunk) % word])):
            v = strip_pac(raw, pac_mask)
            if not lo_all <= v < hi_all or not any(lo <= v < hi for lo, hi in spans):
                continue
            a = at + k * word
            sig = saved_context(read, a)
            if sig or is_return(v):
                hits.append(Hit(a, v, sig))
                if len(hits) >= _MAX_HITS:
                    break
        at += n
    return hits
