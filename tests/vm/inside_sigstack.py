"""Run inside the arm64 machine (scripts/vm aarch64) by tests/vm/test_sigstack_aarch64.py and
tests/fixtures/make-sigstack-aarch64.sh:

    python3 inside_sigstack.py DIR [--fixture]

DIR holds a64sigs, a64stack_fp and a64stack_nofp (tests/targets/a64sigs.c, a64stack.c built
for aarch64). Prints one JSON object of what it saw; asserts nothing.

"raw": the facts under --signals and --stack, seen with tracer.target alone (no engine), and
what tracer.sigtrack and tracer.unwind make of them live ("tracker", "unwound"):
  - "signals": a64sigs --count 25 (2 with --fixture) --forge under PTRACE_SYSCALL; at each SIGUSR1
    signal-delivery-stop a PTRACE_SINGLESTEP with the signal stops at the handler's first
    instruction (the engine's way): its registers (NT_PRSTATUS) and the stack from sp to the
    frame record x29 points at (+16); at each rt_sigreturn entry the registers and the 4688
    bytes at sp (struct rt_sigframe); the program's record.
  - "stacks": each a64stack build with `brk #0` on __kernel_clock_gettime's entry: at the two
    stops (the call through the vDSO's symbol, then through glibc's clock_gettime) the
    registers, the stack from sp's page to the end of [stack], /proc/PID/maps, the PAC mask
    (NT_ARM_PAC_MASK); the stack unwound with the process's own module map (glibc's CFI
    included); the program's record (glibc's backtrace() of the chain).
"trace" (unless --fixture): `vdsotrace trace --json --signals` on a64sigs --forge and on
a64sigs --own-restorer (SA_RESTORER), on a64sigs --in-vdso (signals from a timer while it
calls __kernel_clock_gettime in a loop) with that function untraced (-e gettimeofday: they
interrupt the vDSO itself) and traced (they interrupt its stub and relocated body), and
`vdsotrace trace --json --stack` on both a64stack builds: events, stderr, exit statuses and
the programs' records.
"""
from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from inside_common import finish

from tracer import sigtrack, target
from tracer.arch import aarch64 as A
from tracer.modmap import ModuleMap
from tracer.objfile import ObjectFile
from tracer.unwind import unwind

NR_RT_SIGRETURN = 139
RT_SIGFRAME = 128 + 4560         # siginfo + struct ucontext (its sigcontext's __reserved[4096])
STACK_BUILDS = ("a64stack_fp", "a64stack_nofp")


def regs_of(pid: int) -> dict[str, int]:
    regs = target.Regs()
    A.AARCH64.regs_get(pid, regs)
    return {n: regs[n] for n in A.REG_NAMES}


def start(argv: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout is not None
    line = p.stdout.readline().decode().split()
    if not line or line[0] != "ready":
        raise RuntimeError(f"{argv[0]} did not start: {line}")
    return p, int(line[1])


def go(p: subprocess.Popen[bytes]) -> None:
    assert p.stdin is not None
    p.stdin.write(b"g")
    p.stdin.flush()


def raw_signals(d: Path, count: int) -> dict[str, Any]:
    record = d / "raw-sigs.jsonl"
    p, pid = start([str(d / "a64sigs"), str(record), "--count", str(count), "--forge"])
    out: dict[str, Any] = {"entries": [], "sigreturns": [], "tracker": []}
    tracker = sigtrack.SignalTracker(A.AARCH64)
    try:
        target.attach_process(pid)
        mem = target.Memory(pid)
        live = target.Regs()
        target.syscall(pid, 0)
        go(p)
        while True:
            tid, status = target.wait(pid)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                out["status"] = status
                break
            sig = os.WSTOPSIG(status)
            if sig == signal.SIGUSR1:
                target.singlestep(pid, sig)
                tid, status = target.wait(pid)
                if not os.WIFSTOPPED(status) or os.WSTOPSIG(status) != signal.SIGTRAP:
                    raise RuntimeError(f"no stop at the handler: {status:#x}")
                r = regs_of(pid)
                sp, fp = r["sp"], r["x29"]
                out["entries"].append({"regs": r, "mem_at": sp,
                                       "mem": mem.read(sp, fp + 16 - sp).hex()})
                A.AARCH64.regs_get(pid, live)
                dl = tracker.on_handler_entry(tid, sig, live, mem.read)
                out["tracker"].append(None if dl is None else {
                    "kind": "delivery", "handler": dl.handler, "restorer": dl.restorer,
                    "resume_ip": dl.resume_ip, "frame": dl.frame})
            elif sig == signal.SIGTRAP | 0x80:
                info = target.get_syscall_info(pid)
                if info.op == 1 and info.nr == NR_RT_SIGRETURN:
                    r = regs_of(pid)
                    out["sigreturns"].append({"regs": r, "mem_at": r["sp"],
                                              "mem": mem.read(r["sp"], RT_SIGFRAME).hex(),
                                              "instruction_pointer": info.instruction_pointer})
                    A.AARCH64.regs_get(pid, live)
                    sr = tracker.on_sigreturn(tid, info.nr, live, mem.read, "")
                    out["tracker"].append({
                        "kind": "sigreturn", "resume_ip": sr.resume_ip, "frame": sr.frame,
                        "signo": sr.signo, "anomaly": sr.anomaly})
            target.syscall(pid, 0)
        mem.close()
    except Exception as e:                              # reported, judged on the host
        out["error"] = f"{type(e).__name__}: {e}"
    out["target"] = finish(p, 60)
    out["record"] = [json.loads(x) for x in record.read_text().splitlines()] \
        if record.exists() else []
    return out


def vdso_symbol(pid: int, mem: target.Memory, name: str) -> tuple[int, int, bytes]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    lo, hi = next((int(a, 16), int(b, 16)) for a, b in
                  (line.split()[0].split("-") for line in maps.splitlines()
                   if line.endswith("[vdso]")))
    image = mem.read(lo, hi - lo)
    sym = ObjectFile.from_bytes(image, "[vdso]").symbol(name)
    assert sym is not None
    return lo + sym.value, lo, image


def stack_end(pid: int, sp: int) -> int:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= sp < hi:
            return hi
    raise RuntimeError(f"sp {sp:#x} is not mapped")


def raw_stack(d: Path, build: str) -> dict[str, Any]:
    record = d / f"raw-{build}.jsonl"
    p, pid = start([str(d / build), str(record), "--calls", "1"])
    out: dict[str, Any] = {"stops": []}
    try:
        target.attach_process(pid)
        mem = target.Memory(pid)
        entry, vlo, image = vdso_symbol(pid, mem, "__kernel_clock_gettime")
        out["vdso"] = {"start": vlo, "image": image.hex()}
        out["pac_mask"] = A.read_pac_mask(pid)
        orig = mem.read(entry, 4)
        mem.write(entry, A.BRK_0)
        target.cont(pid)
        go(p)
        for _ in range(2):
            tid, status = target.wait(pid)
            if not os.WIFSTOPPED(status) or os.WSTOPSIG(status) != signal.SIGTRAP:
                raise RuntimeError(f"no stop at the brk: {status:#x}")
            r = regs_of(pid)
            sp = r["sp"]
            lo = sp & ~0xFFF
            hi = stack_end(pid, sp)
            live = target.Regs()
            A.AARCH64.regs_get(pid, live)
            dw: dict[int | str, int] = {i: live[n] for i, n in enumerate(A.AARCH64.dwarf_regs)}
            dw["pc"], dw["sp"] = live["pc"], live["sp"]
            mm = ModuleMap.from_pid(pid, image)
            addrs = unwind(dw, mem.read, mm, "aarch64", 16,
                           pac_mask=A.AARCH64.pac_mask(pid))
            locs = [mm.locate(a) for a in addrs]
            out["stops"].append({"regs": r, "mem_at": lo, "mem": mem.read(lo, hi - lo).hex(),
                                 "maps": Path(f"/proc/{pid}/maps").read_text(),
                                 "unwound": addrs,
                                 "names": [loc.stack_entry if loc else hex(a)
                                           for a, loc in zip(addrs, locs)]})
            mem.write(entry, orig)
            if len(out["stops"]) == 2:
                break
            # step the original instruction, plant the brk again for the next call
            target.singlestep(pid, 0)
            target.wait(pid)
            mem.write(entry, A.BRK_0)
            target.cont(pid)
        mem.close()
        target.detach(pid)          # from the second stop, the function's bytes as they were
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["target"] = finish(p, 60)
    out["record"] = [json.loads(x) for x in record.read_text().splitlines()] \
        if record.exists() else []
    return out


def traced(d: Path, argv: list[str], trace_args: list[str], name: str) -> dict[str, Any]:
    """`vdsotrace trace -p PID --json -o EVENTS TRACE_ARGS` on the program, go byte once the
    tracer is attached, both waited for. The files live in the machine's own memory (`d`):
    a file on the 9p share read while another process writes it showed zeros there."""
    record = d / f"{name}.record.jsonl"
    events = d / f"{name}.events.jsonl"
    p, pid = start([argv[0], str(record), *argv[1:]])
    tr = subprocess.Popen(["vdsotrace", "trace", "-p", str(pid), "--json", "-o", str(events),
                           *trace_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: dict[str, Any] = {}
    # attached: the `attach` event is written once every thread is held (Python under
    # emulation on a loaded host can take a minute to get there; the bound only keeps a hung
    # tracer from hanging the boot)
    deadline = time.monotonic() + 400
    while tr.poll() is None and time.monotonic() < deadline:
        if events.exists() and '"event": "attach"' in events.read_text(errors="replace"):
            break
        time.sleep(0.1)
    go(p)
    out["target"] = finish(p, 60)
    try:
        _, err = tr.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        tr.send_signal(signal.SIGINT)
        _, err = tr.communicate()
    out["tracer"] = {"rc": tr.returncode, "stderr": err.decode(errors="replace")}
    out["events"] = [json.loads(x) for x in events.read_text().splitlines()] \
        if events.exists() else []
    out["record"] = [json.loads(x) for x in record.read_text().splitlines()] \
        if record.exists() else []
    return out


def main() -> int:
    shared = Path(sys.argv[1])
    d = Path(tempfile.mkdtemp(prefix="sigstack-"))    # not on the 9p share: see traced()
    for name in ("a64sigs", *STACK_BUILDS):
        shutil.copy(shared / name, d / name)
    fixture = "--fixture" in sys.argv
    out: dict[str, Any] = {"raw": {"signals": raw_signals(d, 2 if fixture else 25),
                                   "stacks": {b: raw_stack(d, b) for b in STACK_BUILDS}}}
    if not fixture:
        out["trace"] = {
            "signals": traced(d, [str(d / "a64sigs"), "--forge"], ["--signals"], "sigs"),
            "signals_own": traced(d, [str(d / "a64sigs"), "--own-restorer"], ["--signals"],
                                  "sigs-own"),
            "signals_vdso": traced(d, [str(d / "a64sigs"), "--in-vdso"],
                                   ["--signals", "-e", "gettimeofday"], "sigs-vdso"),
            "signals_stub": traced(d, [str(d / "a64sigs"), "--in-vdso"],
                                   ["--signals", "-e", "clock_gettime"], "sigs-stub"),
            **{b: traced(d, [str(d / b), "--calls", "3"], ["--stack"], b)
               for b in STACK_BUILDS}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
