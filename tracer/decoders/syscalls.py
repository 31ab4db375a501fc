"""Which i386 system-call arguments are strings or buffers, so `syscall` events can show them
as strace does (`write(1, "hello\n", 6)`, `openat(AT_FDCWD, "/etc/hosts", ...)`).

Kinds: `path` (NUL-terminated, read at entry), `wbuf` (length in argument 2, read at entry),
`rbuf` (length = the return value, read at exit). Only the first `MAX_STRING` bytes are read.
"""
from __future__ import annotations

from collections.abc import Callable

from tracer.errors import MemoryReadError

__all__ = ["STRING_ARGS", "MAX_STRING", "read_entry_strings", "read_exit_strings"]

MAX_STRING = 32          # strace's default -s

# include/linux/syscalls.h prototypes (the i386 names of arch/x86/entry/syscalls/syscall_32.tbl)
STRING_ARGS: dict[str, tuple[tuple[int, str], ...]] = {
    "open": ((0, "path"),), "creat": ((0, "path"),), "openat": ((1, "path"),),
    "access": ((0, "path"),), "faccessat": ((1, "path"),), "faccessat2": ((1, "path"),),
    "stat64": ((0, "path"),), "lstat64": ((0, "path"),), "fstatat64": ((1, "path"),),
    "statx": ((1, "path"),), "readlink": ((0, "path"),), "readlinkat": ((1, "path"),),
    "unlink": ((0, "path"),), "unlinkat": ((1, "path"),), "mkdir": ((0, "path"),),
    "mkdirat": ((1, "path"),), "rmdir": ((0, "path"),), "chdir": ((0, "path"),),
    "execve": ((0, "path"),), "execveat": ((1, "path"),), "rename": ((0, "path"), (1, "path")),
    "write": ((1, "wbuf"),), "read": ((1, "rbuf"),),
}

ReadFn = Callable[[int, int], bytes]


def _cstring(read: ReadFn, addr: int) -> bytes | None:
    # Read up to the end of the page first: a short string near a page end still reads.
    first = min(MAX_STRING + 1, 4096 - (addr & 4095))
    try:
        data = read(addr, first)
        if b"\0" not in data and first < MAX_STRING + 1:
            data += read(addr + first, MAX_STRING + 1 - first)
    except MemoryReadError:
        return None
    nul = data.find(b"\0")
    return data[:nul] if nul >= 0 else data


def _buffer(read: ReadFn, addr: int, length: int) -> bytes | None:
    if length <= 0:
        return b""
    try:
        return read(addr, min(length, MAX_STRING + 1))
    except MemoryReadError:
        return None


def read_entry_strings(name: str, args: tuple[int, ...], read: ReadFn) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for i, kind in STRING_ARGS.get(name, ()):
        if not args[i]:
            continue
        data = (_cstring(read, args[i]) if kind == "path"
                else _buffer(read, args[i], args[2]) if kind == "wbuf" else None)
        if data is not None:
            out[i] = data
    return out


def read_exit_strings(name: str, args: tuple[int, ...], ret: int,
                      read: ReadFn) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for i, kind in STRING_ARGS.get(name, ()):
        if kind == "rbuf" and args[i] and ret > 0:
            data = _buffer(read, args[i], ret)
            if data is not None:
                out[i] = data
    return out
