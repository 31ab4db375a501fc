"""Run inside the arm64 machine (scripts/vm aarch64) by tests/vm/test_ptrace_aarch64.py:

    python3 inside_ptrace.py TARGET OUTDIR

The ptrace layer on arm64 (tracer.target), on TARGET (tests/targets/a64brk.c built for aarch64),
which has already called __kernel_clock_gettime thousands of times and waits for its go byte:
attach (PTRACE_SEIZE + INTERRUPT), registers through PTRACE_GETREGSET(NT_PRSTATUS), the PAC
mask (NT_ARM_PAC_MASK); a `brk #0` written over the function's first instruction through
/proc/PID/mem; continue, go byte, the SIGTRAP stop; the original instruction written back, x0
changed through PTRACE_SETREGSET (CLOCK_REALTIME -> CLOCK_MONOTONIC: the program's record
shows which clock it got); then PTRACE_SYSCALL to its two getppid calls, changing the first's
x8 and the second's NT_ARM_SYSTEM_CALL to getpid (syscall_phase); detach. Prints one JSON object of what it saw; asserts nothing.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from inside_common import finish

from tracer import target
from tracer.arch import aarch64 as A


NR_GETPPID, NR_GETPID = 173, 172     # include/uapi/asm-generic/unistd.h


def syscall_phase(pid: int) -> list[dict[str, Any]]:
    """From the brk stop (its SIGTRAP not delivered) on with PTRACE_SYSCALL, up to the exit of
    the program's second getppid: at the first getppid's entry change only x8 to getpid, at the
    second's NT_ARM_SYSTEM_CALL. Every syscall stop seen: entry/exit, x7, x8, the regset."""
    seen: list[dict[str, Any]] = []
    regs = target.Regs()
    sysno = (ctypes.c_int32 * 1)()
    getppid_entries = 0
    target.syscall(pid, 0)
    while True:
        tid, status = target.wait(pid)
        if not os.WIFSTOPPED(status):
            raise RuntimeError(f"the program ended during the syscall phase: {status:#x}")
        if os.WSTOPSIG(status) != signal.SIGTRAP | 0x80:
            raise RuntimeError(f"unexpected stop {status:#x}")
        info = target.get_syscall_info(pid)
        A.AARCH64.regs_get(pid, regs)
        target.getregset(pid, A.NT_ARM_SYSTEM_CALL, sysno)
        stop: dict[str, Any] = {"op": info.op, "nr": info.nr, "x7": regs["x7"], "x8": regs["x8"],
                "system_call": sysno[0], "x0": regs["x0"]}
        if info.op == 1 and info.nr == NR_GETPPID:
            getppid_entries += 1
            if getppid_entries == 1:
                regs["x8"] = NR_GETPID
                A.AARCH64.regs_set(pid, regs)
                stop["changed"] = "x8"
            else:
                sysno[0] = NR_GETPID
                target.setregset(pid, A.NT_ARM_SYSTEM_CALL, sysno)
                stop["changed"] = "NT_ARM_SYSTEM_CALL"
            target.getregset(pid, A.NT_ARM_SYSTEM_CALL, sysno)
            stop["system_call_after"] = sysno[0]
        seen.append(stop)
        if info.op == 2 and getppid_entries == 2:
            return seen
        if len(seen) > 200:
            raise RuntimeError("no getppid in 200 system call stops")
        target.syscall(pid, 0)


def main() -> int:
    tgt, outdir = sys.argv[1], Path(sys.argv[2])
    record = outdir / "brk-record.jsonl"
    p = subprocess.Popen([tgt, str(record), "--warm", "20000"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stdin is not None
    _, spid, sentry = p.stdout.readline().decode().split()
    pid, entry = int(spid), int(sentry, 16)
    out: dict[str, Any] = {"pid": pid, "entry": entry, "realtime": time.time(),
                           "maps": Path(f"/proc/{pid}/maps").read_text()}
    try:
        tids, pending = target.attach_process(pid)
        out["tids"], out["pending"] = tids, pending
        regs = target.Regs()
        mem = target.Memory(pid)
        out["prstatus_bytes"] = target.getregset(pid, A.NT_PRSTATUS, regs.buf)
        out["attach"] = {"pc": regs["pc"], "x8": regs["x8"], "sp": regs["sp"],
                         "insn_at_pc": mem.read(regs["pc"], 4).hex()}
        pac = target.read_regset(pid, A.NT_ARM_PAC_MASK, 16)
        out["pac_mask"] = [int.from_bytes(pac[:8], "little"), int.from_bytes(pac[8:16], "little")]
        lo, hi = next((int(a, 16), int(b, 16)) for a, b in
                      (line.split()[0].split("-") for line in out["maps"].splitlines()
                       if line.endswith("[vdso]")))
        image_before = mem.read(lo, hi - lo)
        orig = mem.read(entry, 4)
        mem.write(entry, A.BRK_0)
        out["planted"] = mem.read(entry, 4).hex()
        target.cont(pid)
        p.stdin.write(b"g")
        p.stdin.flush()
        tid, status = target.wait(pid)
        out["stop"] = {"tid": tid, "stopped": os.WIFSTOPPED(status),
                       "sig": os.WSTOPSIG(status) if os.WIFSTOPPED(status) else None,
                       "event": target.stop_event(status)}
        A.AARCH64.regs_get(pid, regs)
        out["at_brk"] = {"pc": regs["pc"], "x0": regs["x0"], "x1": regs["x1"], "x30": regs["x30"],
                         "sp": regs["sp"], "insn_at_pc": mem.read(regs["pc"], 4).hex()}
        mem.write(entry, orig)
        out["restored"] = mem.read(entry, 4) == orig
        out["image_restored"] = mem.read(lo, hi - lo) == image_before
        regs["x0"] = 1                                  # CLOCK_MONOTONIC instead of REALTIME
        A.AARCH64.regs_set(pid, regs)
        check = target.Regs()
        A.AARCH64.regs_get(pid, check)
        out["after_setregs"] = {"pc": check["pc"], "x0": check["x0"],
                                "same_otherwise": all(check[n] == regs[n] for n in A.REG_NAMES)}
        mem.close()
        out["syscalls"] = syscall_phase(pid)
        target.detach(pid)
        out["detached"] = True
    except Exception as e:                              # reported, judged on the host
        out["error"] = f"{type(e).__name__}: {e}"
    out["target"] = finish(p, 120)
    out["record"] = json.loads(record.read_text()) if record.exists() else None
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
