"""Run inside the arm64 machine (scripts/vm aarch64) by tests/vm/test_trace_aarch64.py:

    python3 inside_trace.py TARGET OUTDIR [SCENARIO...]

The stop-based engine on arm64 tracees, driven through the CLI (`vdsotrace`, on PATH there) and
the console's control interface, on TARGET (tests/targets/a64trace.c built for aarch64). Each
scenario runs the target, traces it one way, lets it finish, and reports what it saw: the
target's record, the tracer's output, its exit status and stderr, the target's vDSO bytes
before the attach and after the tracer left (while the target still ran), and how the target
ended. Prints one JSON object {scenario: report}; asserts nothing.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from inside_common import finish

ROUNDS = 4


def vdso_bytes(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        line = next(x for x in f if x.rstrip().endswith("[vdso]"))
    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
    with open(f"/proc/{pid}/mem", "rb") as m:
        m.seek(lo)
        return m.read(hi - lo).hex()


def read_line(p: subprocess.Popen[bytes], want: bytes, timeout: float = 60.0) -> bytes:
    """Read the target's stdout until a line starting with `want`."""
    assert p.stdout is not None
    fd = p.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while True:
        for line in buf.split(b"\n")[:-1]:
            if line.startswith(want):
                return line
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"no {want!r} line from the target: {buf!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the target closed its stdout before {want!r}: {buf!r}")
            buf += chunk


def wait_file(path: Path, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{path} never showed {text!r}")


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@contextlib.contextmanager
def scenario(target: str, rec: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[bytes],
                                                                  dict[str, Any]]]:
    """The target started (writing its record to `rec`) and ready, its vDSO bytes in the
    report as "before"; what the scenario raises is reported, not raised (the other
    scenarios still run), the target then killed; its record goes into the report. (A target
    that never gets ready is reported too.)"""
    p = subprocess.Popen([target, str(rec), "--rounds", str(ROUNDS), *extra],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rep: dict[str, Any] = {}
    try:
        read_line(p, b"ready")
        rep["before"] = vdso_bytes(p.pid)
    except Exception as ex:
        # a generator context manager must yield once: the scenario then fails against the
        # killed target, and this first error is the one reported
        rep["error"] = repr(ex)
        p.kill()
        p.wait()
    try:
        yield p, rep
    except Exception as ex:
        rep.setdefault("error", repr(ex))
        p.kill()
        p.wait()
    rep["record"] = records(rec) if rec.exists() else []


def go(p: subprocess.Popen[bytes]) -> None:
    """The target's go byte; back once it says it made its calls."""
    assert p.stdin is not None
    p.stdin.write(b"g")
    p.stdin.flush()
    read_line(p, b"done")


def attach_run(target: str, out: Path, name: str, opts: list[str], json_out: bool,
               extra: tuple[str, ...] = (), sig: int = signal.SIGINT) -> dict[str, Any]:
    """`vdsotrace trace -p PID OPTS` on a running target (run with `extra` arguments); `sig`
    once the target is done (the tracer leaves while the target still runs)."""
    rec = out / f"{name}.rec"
    tout = out / f"{name}.out"
    terr = out / f"{name}.err"
    tout.unlink(missing_ok=True)
    with scenario(target, rec, *extra) as (p, rep):
        rep["threads_at_attach"] = len(os.listdir(f"/proc/{p.pid}/task"))
        with open(terr, "wb") as e:
            tr = subprocess.Popen(["vdsotrace", "trace", "-p", str(p.pid), *opts, "-o",
                                   str(tout)], stderr=e)
            wait_file(tout, '"attach"' if json_out else "attached to")
            go(p)
            tr.send_signal(sig)
            rep["tracer_rc"] = tr.wait(60)
        rep["after"] = vdso_bytes(p.pid)
        rep["target"] = finish(p, 30, b"x")
    rep["stdout"] = tout.read_text(errors="replace") if tout.exists() else ""
    rep["stderr"] = terr.read_text(errors="replace") if terr.exists() else ""
    return rep


def spawn_run(target: str, out: Path, name: str, opts: list[str],
              shell: bool = False) -> dict[str, Any]:
    """`vdsotrace trace OPTS -- TARGET` (with `shell`, `-- sh -c 'exec TARGET ...'`: the
    traced process execs the target); the tracer's stdin/stdout are the target's; the tracer
    ends with the target."""
    rec = out / f"{name}.rec"
    tout = out / f"{name}.jsonl"
    terr = out / f"{name}.err"
    rep: dict[str, Any] = {}
    cmd = [target, str(rec), "--rounds", str(ROUNDS)]
    if shell:
        cmd = ["sh", "-c", "exec " + " ".join(cmd)]
    with open(terr, "wb") as e:
        tr = subprocess.Popen(["vdsotrace", "trace", *opts, "-o", str(tout), "--", *cmd],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=e)
        try:
            read_line(tr, b"ready")
            assert tr.stdin is not None
            tr.stdin.write(b"g")
            tr.stdin.flush()
            read_line(tr, b"done")
            tr.stdin.write(b"x")
            tr.stdin.close()
            rep["tracer_rc"] = tr.wait(60)
        except Exception as ex:
            rep["error"] = repr(ex)
            tr.kill()
            tr.wait()
    rep["record"] = records(rec) if rec.exists() else []
    rep["stdout"] = tout.read_text(errors="replace") if tout.exists() else ""
    rep["stderr"] = terr.read_text(errors="replace")
    return rep


def record_run(target: str, out: Path) -> dict[str, Any]:
    """`vdsotrace record -p PID -o FILE`, SIGINT once the target is done, then `vdsotrace
    report FILE --json`."""
    rec = out / "record.rec"
    recording = out / "record.vdsotrace"
    with scenario(target, rec) as (p, rep):
        tr = subprocess.Popen(["vdsotrace", "record", "-p", str(p.pid), "-o", str(recording)],
                              stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60        # planted: the entries are patched
        while vdso_bytes(p.pid) == rep["before"]:
            if time.monotonic() > deadline:
                raise RuntimeError("record never patched the vDSO")
            time.sleep(0.1)
        time.sleep(0.5)                          # (planted before the threads run again)
        go(p)
        tr.send_signal(signal.SIGINT)
        _, err = tr.communicate(timeout=60)
        rep["tracer_rc"] = tr.returncode
        rep["stderr"] = err.decode(errors="replace")
        rep["after"] = vdso_bytes(p.pid)
        rep["target"] = finish(p, 30, b"x")
        r = subprocess.run(["vdsotrace", "report", str(recording), "--json"],
                           capture_output=True, timeout=120)
        rep["report_rc"] = r.returncode
        rep["stdout"] = r.stdout.decode(errors="replace")
        rep["report_stderr"] = r.stderr.decode(errors="replace")
    return rep


def duration_run(target: str, out: Path) -> dict[str, Any]:
    """`vdsotrace trace -p PID --duration 3` on an idle target: the tracer leaves by itself;
    then the target makes its calls untraced and exits normally."""
    rec = out / "duration.rec"
    tout = out / "duration.jsonl"
    with scenario(target, rec) as (p, rep):
        tr = subprocess.Popen(["vdsotrace", "trace", "-p", str(p.pid), "--duration", "3",
                               "--json", "-o", str(tout)], stderr=subprocess.PIPE)
        _, err = tr.communicate(timeout=120)
        rep["tracer_rc"] = tr.returncode
        rep["stderr"] = err.decode(errors="replace")
        rep["stdout"] = tout.read_text()
        rep["after"] = vdso_bytes(p.pid)
        go(p)
        rep["target"] = finish(p, 30, b"x")
    return rep


def guardian_run(target: str, out: Path) -> dict[str, Any]:
    """`vdsotrace trace -p PID` SIGKILLed while the target idles (no thread at a brk): the
    guardian process puts the original code back; then the target makes its calls untraced
    and exits normally."""
    rec = out / "guardian.rec"
    tout = out / "guardian.jsonl"
    with scenario(target, rec) as (p, rep):
        tr = subprocess.Popen(["vdsotrace", "trace", "-p", str(p.pid), "--json", "-o", str(tout)],
                              stderr=subprocess.DEVNULL)
        wait_file(tout, '"attach"')
        rep["planted"] = vdso_bytes(p.pid)
        tr.kill()
        tr.wait(30)
        # the guardian writes once it sees the tracer's socket closed
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rep["after"] = vdso_bytes(p.pid)
            status = open(f"/proc/{p.pid}/status").read()
            if "TracerPid:\t0" in status and rep["after"] != rep["planted"]:
                break
            time.sleep(0.1)
        time.sleep(0.5)
        rep["after"] = vdso_bytes(p.pid)
        go(p)
        rep["target"] = finish(p, 30, b"x")
    return rep


def console_run(target: str, out: Path) -> dict[str, Any]:
    """The console's control interface (tracer.engine.control.Control) on an attached target:
    pause, snapshot, set functions, --inject on and off, resume, the calls, stop."""
    from concurrent.futures import Future

    from tracer.engine.control import Control
    from tracer.events import CallEvent, Event
    from tracer.session import Session, TraceOptions

    rec = out / "console.rec"

    def done(f: Future[Any]) -> Any:
        return f.result(60)

    with scenario(target, rec) as (p, rep):
        events: list[Event] = []
        lock = threading.Lock()

        def sink(e: Event) -> None:
            with lock:
                events.append(e)

        ctl = Control(Session(TraceOptions(pin=False), sink))
        engine = ctl.start(pid=p.pid)
        done(ctl.pause())
        snap = ctl.snapshot()
        rep["paused"] = {"state": snap.state, "abi": snap.abi, "functions": list(snap.functions),
                         "threads": len(snap.threads)}
        rep["set_functions"] = done(ctl.set_functions(["clock_gettime,gettimeofday"]))
        try:
            done(ctl.set_inject(True))
            rep["inject"] = "accepted"
            rep["inject_on"] = ctl.snapshot().inject
            done(ctl.set_inject(False))          # and back to the stop-based engine
        except Exception as ex:
            rep["inject"] = f"{type(ex).__name__}: {ex}"
        rep["after_inject"] = {"inject": ctl.snapshot().inject,
                               "functions": list(ctl.snapshot().functions)}
        done(ctl.resume())
        go(p)
        deadline = time.monotonic() + 30
        want = 2 * ROUNDS * 6           # clock_gettime x4 + gettimeofday x2 a round, 2 threads
        while time.monotonic() < deadline:
            with lock:
                n = sum(isinstance(e, CallEvent) for e in events)
            if n >= want:
                break
            time.sleep(0.1)
        done(ctl.pause())
        summ = done(ctl.summary())
        rep["summary"] = {r.func: [r.calls, r.fallbacks, r.errors] for r in summ.rows}
        rep["reasons"] = summ.reasons
        ctl.stop()
        engine.join(60)
        rep["engine_alive"] = engine.is_alive()
        rep["state"] = ctl.snapshot().state
        with lock:
            rep["calls"] = [{"tid": e.tid, "func": e.func, "args": json.loads(json.dumps(
                e.args, default=str)), "ret": e.ret, "fallback": e.fallback}
                for e in events if isinstance(e, CallEvent)]
        rep["after"] = vdso_bytes(p.pid)
        rep["target"] = finish(p, 30, b"x")
    return rep


def main() -> None:
    # the files the tracer writes and the test polls live in the machine's own memory, not
    # in the shared directory (virtio-9p: a file read while another process appends to it
    # was seen holding zeros there)
    target, out = sys.argv[1], Path(tempfile.mkdtemp(prefix="inside-trace-"))
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "json": lambda: attach_run(target, out, "json", ["--json"], True),
        "count": lambda: attach_run(target, out, "count", ["-c"], False),
        "timing": lambda: attach_run(target, out, "timing", ["-T"], False, sig=signal.SIGTERM),
        "fork": lambda: attach_run(target, out, "fork", ["--json", "-f"], True, ("--fork",)),
        "nofork": lambda: attach_run(target, out, "nofork", ["--json"], True, ("--fork",)),
        "seccomp": lambda: attach_run(target, out, "seccomp", ["--json"], True, ("--seccomp",)),
        "select": lambda: attach_run(target, out, "select",
                                     ["--json", "-e", "clock_getres,getrandom"], True),
        "duration": lambda: duration_run(target, out),
        "record": lambda: record_run(target, out),
        "exec": lambda: spawn_run(target, out, "exec", ["--json"], shell=True),
        "spawn": lambda: spawn_run(target, out, "spawn", ["--json"]),
        "console": lambda: console_run(target, out),
        "guardian": lambda: guardian_run(target, out),
    }
    wanted = sys.argv[3:] or list(runs)
    res: dict[str, Any] = {}
    if "console" in wanted:
        # in the main thread, alone: Control.start installs the engine's wake-up signal
        # handler (SIGALRM) only there
        res["console"] = runs["console"]()
    # the others two at a time (the machine has 2 CPUs): each has its own target, tracer and
    # files; what is checked is exact, not timed
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(runs[name]) for name in wanted if name != "console"}
    res.update({name: f.result() for name, f in futures.items()})
    print(json.dumps(res))


if __name__ == "__main__":
    main()
