"""Parsers for /proc/<pid>/{maps,stat,status,task,auxv,exe}. No ptrace here.

The kernel writes paths and comm as bytes (any but NUL, and "/" in comm); they are decoded
as os.fsdecode does (UTF-8 with surrogateescape), so an invalid byte survives as a lone
surrogate, opens the same file again, and is escaped (tracer.render.escape) on output."""
from __future__ import annotations

import os
from dataclasses import dataclass

# The decoding of text read from /proc: a file name's bytes, round-tripped (PEP 383).
ENCODING = "utf-8"
ERRORS = "surrogateescape"

__all__ = ["ENCODING", "ERRORS",
    "MapEntry", "read_maps", "parse_maps", "parse_map_line", "Stat", "read_stat", "parse_stat",
    "read_status",
    "tracer_pid", "list_tasks", "exe_elf_class", "read_auxv_file", "process_exists",
    "PF_KTHREAD", "proc_name", "thread_comm",
]

PF_KTHREAD = 0x00200000  # include/linux/sched.h


@dataclass(frozen=True, slots=True)
class MapEntry:
    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def executable(self) -> bool:
        return "x" in self.perms

    def contains(self, addr: int) -> bool:
        return self.start <= addr < self.end


def parse_map_line(line: str) -> MapEntry:
    """`start-end perms offset dev inode [path]` (fs/proc/task_mmu.c: show_map_vma); the path
    may hold spaces and ends with " (deleted)" when the file was unlinked. ValueError if the
    line is not one."""
    parts = line.rstrip("\n").split(None, 5)
    if len(parts) < 5 or "-" not in parts[0]:
        raise ValueError(f"not a maps line: {line!r}")
    lo, _, hi = parts[0].partition("-")
    return MapEntry(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), parts[3],
                    int(parts[4]), parts[5] if len(parts) > 5 else "")


def parse_maps(text: str) -> list[MapEntry]:
    """Every line of /proc/PID/maps (the one parser of it: objfile's module map uses it too)."""
    entries = []
    # split at "\n" only: the kernel escapes it in paths (seq_path), not \x1c or \x85
    for line in text.split("\n"):
        if line.strip():
            try:
                entries.append(parse_map_line(line))
            except ValueError:
                continue
    return entries


def read_maps(pid: int) -> list[MapEntry]:
    with open(f"/proc/{pid}/maps", encoding=ENCODING, errors=ERRORS) as f:
        return parse_maps(f.read())


@dataclass(frozen=True, slots=True)
class Stat:
    """The fields of /proc/PID/stat we use (proc(5) numbering in comments)."""
    pid: int
    comm: str
    state: str          # (3)
    ppid: int           # (4)
    flags: int          # (9)
    start_stack: int    # (28)
    processor: int      # (39)


def parse_stat(text: str) -> Stat:
    # comm (2) may contain spaces and parentheses: it ends at the last ')'.
    lpar, rpar = text.index("("), text.rindex(")")
    rest = text[rpar + 2:].split()
    # rest[0] is field (3)
    return Stat(int(text[:lpar]), text[lpar + 1:rpar], rest[0], int(rest[1]), int(rest[6]),
                int(rest[25]), int(rest[36]))


def read_stat(pid: int, tid: int | None = None) -> Stat:
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(path, encoding=ENCODING, errors=ERRORS) as f:
        return parse_stat(f.read())


def runnable(tid: int) -> bool:
    """The thread is running or waits for a CPU (state R, proc(5)); False when it sleeps in
    the kernel, is stopped, or is gone."""
    try:
        return read_stat(tid).state == "R"
    except (OSError, ValueError):
        return False


def read_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status", encoding=ENCODING, errors=ERRORS) as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def tracer_pid(pid: int) -> int:
    return int(read_status(pid).get("TracerPid", "0"))


def proc_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding=ENCODING, errors=ERRORS) as f:
            return f.read().rstrip("\n")
    except OSError:
        return "?"


def process_exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def list_tasks(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def exe_elf_class(pid: int) -> int | None:
    """1 for ELFCLASS32, 2 for ELFCLASS64, None when /proc/PID/exe is unreadable."""
    try:
        with open(f"/proc/{pid}/exe", "rb") as f:
            ident = f.read(5)
    except OSError:
        return None
    if ident[:4] != b"\x7fELF":
        return None
    return ident[4]


def read_auxv_file(pid: int) -> bytes:
    with open(f"/proc/{pid}/auxv", "rb") as f:
        return f.read()


def thread_comm(pid: int, tid: int) -> str | None:
    """/proc/PID/task/TID/comm: the thread's name (prctl PR_SET_NAME, at most 15 bytes, any byte
    but NUL), undecodable bytes as \\xNN; None once the thread is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/comm", "rb") as f:
            data = f.read()
    except OSError:
        return None
    if data.endswith(b"\n"):
        data = data[:-1]
    return data.decode("utf-8", "backslashreplace")
