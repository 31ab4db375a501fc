"""Run inside the arm64 machine (scripts/vm aarch64) by tests/vm/test_inject_aarch64.py:

    python3 inside_inject.py TARGET OUTDIR

--inject's recorder (tracer.inject.Recorder) on TARGET (tests/targets/a64inj.c built for
aarch64), driven directly (the stop-based engine's `trace` is not on arm64 yet): attach to
every thread (waiting for its go byte), install (remote system calls from the vDSO's `svc #0`,
the code page, the ring, the entries patched), /proc/PID/maps and the registers of every
thread before and after; resume, go byte, drain the ring while both threads run their calls,
until the program says "done" (its threads then block in read); stop every thread, uninstall,
drain the rest; maps, vDSO bytes and registers after; detach; quit byte; the program's exit.
Prints one JSON object of what it saw (the records, the program's own record); asserts
nothing.
"""
from __future__ import annotations

import ctypes
import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from inside_common import finish

from tracer import procfs, target
from tracer.arch import aarch64 as A
from tracer.inject import Recorder
from tracer.inject import layout as L
from tracer.vdso import SIGRETURN_TRAMPOLINES, parse_image


def vdso_range(pid: int) -> tuple[int, int]:
    for m in procfs.read_maps(pid):
        if m.path == "[vdso]":
            return m.start, m.end
    raise RuntimeError("no [vdso]")


def thread_state(tids: list[int]) -> dict[str, Any]:
    """Every register and regs->syscallno of each stopped thread."""
    out = {}
    for t in tids:
        regs = target.Regs()
        target.getregs(t, regs)
        sysno = (ctypes.c_int32 * 1)()
        target.getregset(t, A.NT_ARM_SYSTEM_CALL, sysno)
        out[str(t)] = {"regs": [regs[n] for n in A.REG_NAMES], "syscallno": sysno[0]}
    return out


def stop_all(tids: list[int]) -> None:
    for t in tids:
        target.interrupt(t)
    left = set(tids)
    while left:
        tid, status = target.wait(-1)
        if os.WIFSTOPPED(status):
            left.discard(tid)
        else:
            raise RuntimeError(f"thread {tid} ended: {status:#x}")


def record_dict(r: Any) -> dict[str, Any]:
    return {"tid": r.tid, "func": r.func, "args": list(r.args), "ret": r.ret,
            "outs": [o.hex() if o is not None else None for o in r.outs],
            "fallback": r.fallback, "t": r.t_entry_ns, "dur": r.duration_ns,
            "caller": r.caller}


def main() -> int:
    tgt, outdir = sys.argv[1], Path(sys.argv[2])
    iters = sys.argv[3] if len(sys.argv) > 3 else "300"
    record = outdir / "inject-record.txt"
    p = subprocess.Popen([tgt, str(record), "--iters", iters], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stdin is not None
    pid = int(p.stdout.readline().decode().split()[1])
    out: dict[str, Any] = {"pid": pid}
    records: list[dict[str, Any]] = []
    try:
        tids, pending = target.attach_process(pid)
        out["tids"] = tids
        time.sleep(0.2)
        mem = target.Memory(pid)
        lo, hi = vdso_range(pid)
        vdso_before = mem.read(lo, hi - lo)
        out["maps_before"] = Path(f"/proc/{pid}/maps").read_text()
        image = parse_image(vdso_before)
        funcs = [f for f in image.functions if f.symbol not in SIGRETURN_TRAMPOLINES]
        out["funcs"] = [f.plain for f in funcs]
        Recorder.prepare(image, lo, hi - lo, funcs)
        state_before = thread_state(tids)
        rec = Recorder(pid, mem, A.AARCH64, image, lo, funcs)
        rec.install(tids[0])
        state_after = thread_state(tids)
        out["regs_kept_at_install"] = state_before == state_after
        out["state_install"] = [state_before, state_after]
        out["maps_installed"] = Path(f"/proc/{pid}/maps").read_text()
        out["code_addr"], out["ring_addr"] = rec._code_addr, rec._ring_addr
        assert rec._code is not None
        out["stubs"] = [{"func_addr": s.func_addr, "stub": s.stub} for s in rec._code.stubs]
        out["entries"] = [[s.func_addr, mem.read(s.func_addr, 4).hex()]
                          for s in rec._code.stubs]
        out["fd_modes"] = {}
        for t in tids:
            target.cont(t)
        p.stdin.write(b"g")
        p.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 300
        done = False
        while not done and time.monotonic() < deadline:
            records += [record_dict(r) for r in rec.drain()]
            if sel.select(timeout=0.005):
                line = p.stdout.readline().decode()
                done = line.strip() == "done"
                if not line:
                    break
            tid, status = target.wait_nohang(-1)
            if tid:
                raise RuntimeError(f"unexpected stop of {tid}: {status:#x}")
        out["done"] = done
        records += [record_dict(r) for r in rec.drain()]
        stop_all(tids)
        state_before = thread_state(tids)
        rec.uninstall(tids)
        state_after = thread_state(tids)
        out["regs_kept_at_uninstall"] = state_before == state_after
        out["state_uninstall"] = [state_before, state_after]
        records += [record_dict(r) for r in rec.drain()]
        out["lost"], out["corrupt"] = rec.lost(), rec.corrupt()
        out["code_page_kept"], out["ring_kept"] = rec.code_page_kept, rec.ring_kept
        out["maps_after"] = Path(f"/proc/{pid}/maps").read_text()
        out["vdso_restored"] = mem.read(lo, hi - lo) == vdso_before
        mem.close()
        for t in tids:
            target.detach(t)
        out["detached"] = True
    except Exception as e:                              # reported, judged on the host
        import traceback
        out["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    out["records"] = records
    out["ring"] = {"nslots": L.NSLOTS}
    out["target"] = finish(p, 120, b"q")
    out["record"] = record.read_text() if record.exists() else None
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
