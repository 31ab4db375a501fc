"""Which i386 system-call arguments are strings or buffers, so `syscall` events can show them
as strace does (`write(1, "hello\n", 6)`, `openat(AT_FDCWD, "/etc/hosts", ...)`).

Kinds: `path` (NUL-terminated, read at entry), `wbuf` (length in argument 2, read at entry),
`rbuf` (length = the return value, read at exit). As strace does, buffers show their first
`size` bytes (`-s`, default 32) and paths up to PATH_MAX; one byte more is read, so a cut
string is known to be cut (`clip_strings`).
"""
from __future__ import annotations

from collections.abc import Callable

from tracer.errors import MemoryReadError

__all__ = ["STRING_ARGS", "MAX_STRING", "PATH_MAX", "read_entry_strings", "read_exit_strings",
           "clip_strings"]

MAX_STRING = 32          # strace's default -s
PATH_MAX = 4096          # include/uapi/linux/limits.h; strace prints paths up to it

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


def _limit(kind: str, size: int) -> int:
    return PATH_MAX if kind == "path" else size


def _cstring(read: ReadFn, addr: int, limit: int) -> bytes | None:
    # Read up to the end of the page first: a short string near a page end still reads.
    first = min(limit + 1, 4096 - (addr & 4095))
    try:
        data = read(addr, first)
        if b"\0" not in data and first < limit + 1:
            data += read(addr + first, limit + 1 - first)
    except MemoryReadError:
        return None
    nul = data.find(b"\0")
    return data[:nul] if nul >= 0 else data


def _buffer(read: ReadFn, addr: int, length: int, limit: int) -> bytes | None:
    if length <= 0:
        return b""
    try:
        return read(addr, min(length, limit + 1))
    except MemoryReadError:
        return None


def read_entry_strings(name: str, args: tuple[int, ...], read: ReadFn,
                       size: int = MAX_STRING) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for i, kind in STRING_ARGS.get(name, ()):
        if not args[i]:
            continue
        limit = _limit(kind, size)
        data = (_cstring(read, args[i], limit) if kind == "path"
                else _buffer(read, args[i], args[2], limit) if kind == "wbuf" else None)
        if data is not None:
            out[i] = data
    return out


def read_exit_strings(name: str, args: tuple[int, ...], ret: int,
                      read: ReadFn, size: int = MAX_STRING) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for i, kind in STRING_ARGS.get(name, ()):
        if kind == "rbuf" and args[i] and ret > 0:
            data = _buffer(read, args[i], ret, _limit(kind, size))
            if data is not None:
                out[i] = data
    return out


def clip_strings(name: str, strs: dict[int, bytes],
                 size: int = MAX_STRING) -> tuple[dict[int, bytes], tuple[int, ...]]:
    """What to show of each string (at most its limit) and the indexes of those cut."""
    kinds = dict(STRING_ARGS.get(name, ()))
    out: dict[int, bytes] = {}
    cut: list[int] = []
    for i, data in strs.items():
        limit = _limit(kinds.get(i, "wbuf"), size)
        if len(data) > limit:
            out[i] = data[:limit]
            cut.append(i)
        else:
            out[i] = data
    return out, tuple(cut)
