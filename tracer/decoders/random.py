"""getrandom(void *buffer, size_t len, unsigned int flags, void *opaque_state,
size_t opaque_len) (lib/vdso/getrandom.c). The random bytes are never read or printed."""
from __future__ import annotations

from tracer.abi import Abi
from tracer.decoders import Decoder, ptr, register
from tracer.events import Value

# include/uapi/linux/random.h
_GRND = ((0x0001, "GRND_NONBLOCK"), (0x0002, "GRND_RANDOM"), (0x0004, "GRND_INSECURE"))


def grnd_flags(flags: int) -> int | str:
    if flags == 0:
        return 0
    names = [n for bit, n in _GRND if flags & bit]
    rest = flags & ~0x7
    if rest:
        names.append(f"{rest:#x}")
    return "|".join(names)


def _args(a: tuple[int, ...], abi: Abi) -> dict[str, Value]:
    opaque_len = a[4] & abi.mask
    return {"buffer": ptr(a[0]), "len": a[1] & abi.mask, "flags": grnd_flags(a[2] & 0xFFFFFFFF),
            "opaque_state": ptr(a[3]), "opaque_len": abi.signed(opaque_len)
            if opaque_len == abi.mask else opaque_len}


def _reason(a: tuple[int, ...], ret: int) -> str | None:
    # Without opaque state the vDSO cannot keep a per-thread ChaCha state: it makes the
    # getrandom system call (lib/vdso/getrandom.c: `if (!state) goto fallback_syscall`).
    return "getrandom-no-state" if a[3] == 0 else "unknown"


register(Decoder("getrandom", ("buffer", "len", "flags", "opaque_state", "opaque_len"), (),
                 _args, _reason))
