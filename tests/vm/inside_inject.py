"""Run inside the arm64 machine (scripts/vm aarch64) by tests/vm/test_inject_aarch64.py:

    python3 inside_inject.py TARGET OUTDIR

--inject's recorder (tracer.inject.Recorder) on TARGET (tests/targets/a64inj.c built for
aarch64), driven directly (the stop-based engine's `trace` is not on arm64 yet): attach to
every thread (waiting for its go byte), install (remote system calls from the vDSO's `svc #0`,
the code page, the ring, the entries patched), /proc/PID/maps and the registers of every
thread before and after; resume, go byte, drain the ring while both threads run their calls,
until the program says "done" (its threads then block in read); stop every thread, uninstall,
drain the rest; maps, vDSO bytes and registers after; detach; quit byte; the program's exit.
Then, in the same boot: the refusals (the program under a seccomp filter, and with its vDSO
sealed by mseal): the error and the process untouched; and leaving busy threads: the program
with --spin calls clock_gettime in both threads without pause while the recorder is installed,
drained for a moment and taken out CYCLES times (threads stopped wherever they are: in a stub,
a copy, the ring window), the vDSO checked after each. Prints one JSON object of what it saw
(the records, the program's own record); asserts nothing.
"""
from __future__ import annotations

import ctypes
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from inside_common import finish

from tracer import procfs, target
from tracer.arch import aarch64 as A
from tracer.inject import InjectError, Recorder
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
        A.AARCH64.regs_get(t, regs)
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


def refusal(tgt: str, outdir: Path, flag: str) -> dict[str, Any]:
    """Install into the program started with `flag`: the InjectError, and what it left."""
    p = subprocess.Popen([tgt, str(outdir / f"refuse{flag}.txt"), flag, "--iters", "3"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    ready = p.stdout.readline().decode().split()
    pid = int(ready[1])
    out: dict[str, Any] = {"ready": ready}
    try:
        tids, _ = target.attach_process(pid)
        mem = target.Memory(pid)
        lo, hi = vdso_range(pid)
        before = mem.read(lo, hi - lo)
        maps_before = Path(f"/proc/{pid}/maps").read_text()
        image = parse_image(before)
        funcs = [f for f in image.functions if f.symbol not in SIGRETURN_TRAMPOLINES]
        rec = Recorder(pid, mem, A.AARCH64, image, lo, funcs)
        try:
            rec.install(tids[0])
            out["installed"] = True
            rec.uninstall(tids)
        except InjectError as e:
            out["refused"] = str(e)
        out["untouched"] = (mem.read(lo, hi - lo) == before
                            and Path(f"/proc/{pid}/maps").read_text() == maps_before)
        mem.close()
        for t in tids:
            target.detach(t)
    except Exception as e:
        import traceback
        out["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    out["target"] = finish(p, 60, b"gq")
    return out


MODES = ("drain", "drain", "wait", "silent", "lossy", "drain", "signal", "signal", "signal",
         "drain")


def spin(tgt: str, outdir: Path, modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    """One attach/install/leave cycle per mode: "drain": drained as the engine does;
    "wait": only heartbeats for 1.5 s (the ring fills, the stubs wait), then drained; "silent":
    nothing for 1.5 s (the stubs stop waiting after 0.5 s and count); "lossy": a --lossy
    recorder, not drained for 1.5 s; "signal": drained, then the second thread's SIGUSR1
    handler blocks (the pc it interrupted: "sig_pc"), the recorder leaves while it is blocked
    (in a stub, its code page must stay; in a ring-writing window, its ring too), detach,
    release: the handler returns to that pc."""
    record = outdir / "spin.txt"
    p = subprocess.Popen([tgt, str(record), "--spin"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stdin is not None
    pid = int(p.stdout.readline().decode().split()[1])
    out: dict[str, Any] = {"cycles": []}
    p.stdin.write(b"g")
    p.stdin.flush()
    time.sleep(0.3)
    try:
        for mode in modes:
            c: dict[str, Any] = {"mode": mode}
            tids, _ = target.attach_process(pid)
            mem = target.Memory(pid)
            lo, hi = vdso_range(pid)
            before = mem.read(lo, hi - lo)
            image = parse_image(before)
            funcs = [f for f in image.functions if f.symbol not in SIGRETURN_TRAMPOLINES]
            rec = Recorder(pid, mem, A.AARCH64, image, lo, funcs, lossy=mode == "lossy")
            rec.install(tids[0])
            for t in tids:
                target.cont(t)
            n = 0
            if mode in ("wait", "silent", "lossy"):
                t_end = time.monotonic() + 1.5
                while time.monotonic() < t_end:
                    if mode == "wait":
                        rec.heartbeat()
                    time.sleep(0.002)
                c["head"] = int.from_bytes(os.pread(rec._ring_fd, 8, L.HEAD), "little")
            t_end = time.monotonic() + 0.4
            while time.monotonic() < t_end:
                n += len(rec.drain(512))      # (a heartbeat per drain, as the engine's)
                time.sleep(0.002)
            if mode == "signal":
                p.stdin.write(b"s")
                p.stdin.flush()
                sel = selectors.DefaultSelector()
                sel.register(p.stdout, selectors.EVENT_READ)
                t_sig = time.monotonic()
                c["before_sig"] = {"lost": rec.lost(), "silence": rec.longest_silence}
                deadline = time.monotonic() + 60
                while not sel.select(timeout=0.002):
                    n += len(rec.drain(512))
                    # the signal-delivery stop of the traced thread: deliver it
                    tid, status = target.wait_nohang(-1)
                    if tid and os.WIFSTOPPED(status) and target.stop_event(status) == 0:
                        target.cont(tid, os.WSTOPSIG(status))
                    if time.monotonic() > deadline:
                        raise RuntimeError("no handler line from the program")
                line = p.stdout.readline().decode().split()
                c["sig_pc"] = int(line[1], 16)
                c["sig_wait_s"] = time.monotonic() - t_sig
                assert rec._code is not None
                c["windows"] = [list(st.window) for st in rec._code.stubs]
                n += len(rec.drain(512))
            c["before_stop"] = {"lost": rec.lost(), "silence": rec.longest_silence,
                                "records": n}
            stop_all(tids)
            c["pcs"] = {}
            regs = target.Regs()
            code = (rec._code_addr, rec._code_addr + L.CODE_SIZE)
            for t in tids:
                A.AARCH64.regs_get(t, regs)
                where = ("code" if code[0] <= regs["pc"] < code[1] else
                         "vdso" if lo <= regs["pc"] < hi else "other")
                c["pcs"][str(t)] = where
            code_range = (rec._code_addr, rec._code_addr + L.CODE_SIZE)
            rec.uninstall(tids)
            n += len(rec.drain())
            c["records"] = n
            c["code_addr"], c["ring_addr"] = code_range[0], rec._ring_addr
            if rec.code_page_kept:
                # what kept it: each thread's pc and the words above its sp into the page
                c["why_kept"] = {}
                for t in tids:
                    A.AARCH64.regs_get(t, regs)
                    sp = regs["sp"]
                    try:
                        raw = mem.read(sp, 4096)
                    except Exception:
                        raw = b""
                    hits = [(k, hex(int.from_bytes(raw[k:k + 8], "little")))
                            for k in range(0, len(raw) - 7, 8)
                            if code_range[0] <= int.from_bytes(raw[k:k + 8], "little")
                            < code_range[1]]
                    c["why_kept"][str(t)] = {"pc": hex(regs["pc"]), "sp": hex(sp),
                                             "code": [hex(x) for x in code_range], "hits": hits}
            c["lost"], c["corrupt"] = rec.lost(), rec.corrupt()
            c["code_page_kept"], c["ring_kept"] = rec.code_page_kept, rec.ring_kept
            c["notices"] = rec.leave_report()[1]
            c["vdso_restored"] = mem.read(lo, hi - lo) == before
            c["memfd_left"] = [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                               if "/memfd:vdsotrace" in line]
            mem.close()
            for t in tids:
                target.detach(t)
            if mode == "signal":
                p.stdin.write(b"r")
                p.stdin.flush()
                c["released"] = p.stdout.readline().decode().strip()
            out["cycles"].append(c)
            time.sleep(0.1)
    except Exception as e:
        import traceback
        out["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    out["target"] = finish(p, 60, b"q")
    out["record"] = record.read_text() if record.exists() else None
    return out


def cntfrq() -> int:
    """cntfrq_el0, read by `mrs x0, cntfrq_el0; ret` mapped executable (through a memfd)."""
    import mmap
    fd = os.memfd_create("cntfrq", os.MFD_CLOEXEC)
    os.write(fd, bytes.fromhex("00e03bd5c0035fd6").ljust(mmap.PAGESIZE, b"\0"))
    buf = mmap.mmap(fd, mmap.PAGESIZE, flags=mmap.MAP_SHARED,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    os.close(fd)
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))
    return int(fn())


def exact(tgt: str, outdir: Path, iters: str, llsc: bool) -> dict[str, Any]:
    """The 2-thread program traced by the recorder from its go byte to its "done" (`llsc`:
    the stubs built for a CPU without LSE atomics: ldxr/stxr)."""
    record = outdir / f"inject-record{'-llsc' if llsc else ''}.txt"
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
        if llsc:
            rec._has_lse = lambda: False        # type: ignore[method-assign]
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
    return out


def cli(tgt: str, outdir: Path) -> dict[str, Any]:
    """`vdsotrace trace -p PID --inject --json -o FILE` (the CLI, the engine's recorder) on the
    2-thread program from its go byte to its "done", then SIGINT; the events, the program's
    record, the vDSO before and after, how both ended."""
    record = outdir / "cli-record.txt"
    # the tracer's output in the machine's own memory, not on the 9p share: a file read there
    # while another process appends to it can read as zero bytes (a NUL line)
    mine = Path(tempfile.mkdtemp(prefix="inject-cli-"))
    tout = mine / "cli.jsonl"
    terr = mine / "cli.err"
    tout.unlink(missing_ok=True)
    p = subprocess.Popen([tgt, str(record), "--iters", "100"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stdin is not None
    pid = int(p.stdout.readline().decode().split()[1])
    rep: dict[str, Any] = {"pid": pid}
    try:
        mem = target.Memory(pid)
        lo, hi = vdso_range(pid)
        before = mem.read(lo, hi - lo)
        with open(terr, "wb") as e:
            tr = subprocess.Popen(["vdsotrace", "trace", "-p", str(pid), "--inject", "--json",
                                   "-o", str(tout)], stderr=e)
            deadline = time.monotonic() + 120
            while not (tout.exists() and '"attach"' in tout.read_text(errors="replace")):
                if time.monotonic() > deadline or tr.poll() is not None:
                    raise RuntimeError("the tracer did not attach")
                time.sleep(0.1)
            p.stdin.write(b"g")
            p.stdin.flush()
            while p.stdout.readline().decode().strip() != "done":
                pass
            tr.send_signal(2)
            rep["tracer_rc"] = tr.wait(120)
        rep["vdso_restored"] = mem.read(lo, hi - lo) == before
        rep["memfd_left"] = [x for x in Path(f"/proc/{pid}/maps").read_text().splitlines()
                             if "/memfd:vdsotrace" in x]
        mem.close()
    except Exception as e:
        rep["error"] = repr(e)
    rep["target"] = finish(p, 60, b"q")
    rep["events"] = [json.loads(x) for x in tout.read_text().splitlines()] if tout.exists() else []
    rep["stderr"] = terr.read_text(errors="replace") if terr.exists() else ""
    rep["record"] = record.read_text() if record.exists() else None
    return rep


def main() -> int:
    tgt, outdir = sys.argv[1], Path(sys.argv[2])
    iters = sys.argv[3] if len(sys.argv) > 3 else "300"
    out = exact(tgt, outdir, iters, False)
    out["llsc"] = exact(tgt, outdir, "100", True)
    from tracer.tsc import TscClock
    out["cntfrq"] = cntfrq()
    out["ns_per_tick"] = TscClock.anchored().rate
    out["cli"] = cli(tgt, outdir)
    out["refusals"] = {flag: refusal(tgt, outdir, flag) for flag in ("--seccomp", "--seal")}
    out["spin"] = spin(tgt, outdir)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
