"""Run inside the arm64 machine (scripts/vm aarch64) by tests/vm/test_vm_aarch64.py:

    python3 inside_smoke.py TARGET OUTDIR

Starts TARGET (tests/targets/a64smoke.c built for aarch64) with LD_SHOW_AUXV=1, and while it
waits for its go byte: runs `vdsotrace vdso|auxv|dump -p PID`, copies its [vdso] mapping
(read from /proc/PID/mem) and /proc/PID/auxv into OUTDIR, attaches to it with python-ptrace
(PTRACE_GETREGSET NT_PRSTATUS on arm64), reads pc and the instruction before it, detaches;
then lets it run and collects its record; runs it again under strace. Prints one JSON object
of what it saw on stdout.
It asserts nothing: the host-side test judges.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from inside_common import finish


def vdso_range(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if line.endswith("[vdso]"):
            lo, hi = line.split()[0].split("-")
            return int(lo, 16), int(hi, 16)
    raise RuntimeError("no [vdso] in maps")


def run(argv: list[str]) -> dict[str, Any]:
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return {"argv": argv, "rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr,
            "seconds": round(time.monotonic() - t0, 2)}


def main() -> int:
    target, outdir = sys.argv[1], Path(sys.argv[2])
    out: dict[str, Any] = {"machine": platform.machine(), "kernel": platform.release(),
                           "python": platform.python_version()}
    t0 = time.monotonic()
    import capstone
    import elftools
    import ptrace
    import tracer
    from ptrace.debugger import PtraceDebugger
    out["imports"] = {"tracer": tracer.__file__, "ptrace": ptrace.__file__,
                      "capstone": capstone.__file__, "elftools": elftools.__file__,
                      "seconds": round(time.monotonic() - t0, 2)}

    record = outdir / "record.jsonl"
    env = dict(os.environ, LD_SHOW_AUXV="1")
    p = subprocess.Popen([target, str(record)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    assert p.stdout is not None and p.stdin is not None
    shown = []
    while True:
        line = p.stdout.readline().decode()
        if not line or line.startswith("ready "):
            break
        shown.append(line)
    out["ready"] = line.strip()
    out["ld_show_auxv"] = "".join(shown)
    pid = p.pid

    lo, hi = vdso_range(pid)
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(lo)
        (outdir / "vdso.so").write_bytes(mem.read(hi - lo))
    (outdir / "auxv.bin").write_bytes(Path(f"/proc/{pid}/auxv").read_bytes())
    out["vdso_range"] = [lo, hi]
    out["vdsotrace"] = {
        "vdso": run(["vdsotrace", "vdso", "-p", str(pid)]),
        "auxv": run(["vdsotrace", "auxv", "-p", str(pid)]),
        "dump": run(["vdsotrace", "dump", "-p", str(pid), "-o", str(outdir / "vdso-dump.so")]),
    }

    # ptrace: attach (the target sleeps in read(0) inside the C library), read the registers
    # through PTRACE_GETREGSET, detach; the target must then run on as if nothing happened.
    pt: dict[str, Any] = {}
    dbg = PtraceDebugger()
    try:
        proc = dbg.addProcess(pid, False)
        try:
            regs = proc.getregs()
            pt["pc"] = regs.pc
            pt["sp"] = regs.sp
            pt["x8"] = regs.r8  # the number of the interrupted system call (63: read)
            pt["pstate"] = regs.pstate
            pt["insn_before_pc"] = proc.readBytes(regs.pc - 4, 4).hex()
            pt["insn_at_pc"] = proc.readBytes(regs.pc, 4).hex()
        finally:
            proc.detach()
        pt["ok"] = True
    except Exception as e:  # reported, judged on the host
        pt["ok"] = False
        pt["error"] = f"{type(e).__name__}: {e}"
    finally:
        dbg.quit()
    out["ptrace"] = pt

    out["target"] = finish(p, 60, go=b"g")
    out["record"] = [json.loads(x) for x in record.read_text().splitlines()] if record.exists() else []

    # strace, the oracle of which calls entered the kernel: a second run of the target under it.
    st = subprocess.run(["strace", "-f", "-qq", "-o", str(outdir / "strace.txt"), "-e",
                         "trace=clock_gettime,gettimeofday,clock_getres,read",
                         target, str(outdir / "record-strace.jsonl")],
                        input=b"g", capture_output=True, timeout=120)
    out["strace"] = {"rc": st.returncode, "stderr": st.stderr.decode(errors="replace"),
                     "lines": (outdir / "strace.txt").read_text().splitlines()
                     if (outdir / "strace.txt").exists() else []}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
