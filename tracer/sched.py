"""The tracer's own scheduling: a short time slice for the thread that serves ptrace stops.

Under --inject the engine thread drains the ring while the tracee's threads run, and a
thread of the tracee that stops (a clone, a signal) waits until the engine thread runs again.
EEVDF (Linux 6.6+) picks the eligible task with the earliest virtual deadline, the deadline
being its time slice away; a task that asks for a short slice (sched_attr.sched_runtime for
SCHED_NORMAL, Linux 6.12+, kernel/sched/syscalls.c; clamped to 0.1-100 ms) gets earlier
deadlines, and a waking one may preempt the running task at once (PREEMPT_SHORT). Its share of
the CPU stays the same (that is the weight, from nice); only the latency changes.
"""
from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["request_short_slice"]

# struct sched_attr, include/uapi/linux/sched/types.h (SCHED_ATTR_SIZE_VER0: 48 bytes)
class _SchedAttr(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32),
                ("sched_flags", ctypes.c_uint64), ("sched_nice", ctypes.c_int32),
                ("sched_priority", ctypes.c_uint32), ("sched_runtime", ctypes.c_uint64),
                ("sched_deadline", ctypes.c_uint64), ("sched_period", ctypes.c_uint64)]


# sched_setattr: arch/x86/entry/syscalls/syscall_64.tbl, include/uapi/asm-generic/unistd.h
_NR_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}
_SCHED_OTHER = 0
_libc = ctypes.CDLL(None, use_errno=True)


def request_short_slice(seconds: float) -> bool:
    """Ask for a `seconds` time slice for the calling thread (SCHED_OTHER, its nice kept).
    False where the kernel or the machine does not offer it; nothing else changes then."""
    nr = _NR_SCHED_SETATTR.get(platform.machine())
    if nr is None:
        return False
    try:
        nice = os.getpriority(os.PRIO_PROCESS, 0)     # the calling thread's, on Linux
    except OSError:
        return False
    attr = _SchedAttr(ctypes.sizeof(_SchedAttr), _SCHED_OTHER, 0, nice, 0,
                      int(seconds * 1e9), 0, 0)
    return bool(_libc.syscall(nr, 0, ctypes.byref(attr), 0) == 0)
