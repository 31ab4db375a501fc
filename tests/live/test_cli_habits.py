"""strace's habits (issue 11.4, 11.6): the trace goes to stderr so the traced program keeps its
stdout; `-o -` is stdout; a closed output pipe (`| head`) ends the trace as SIGINT does, in
both engines, leaving the tracee as it was; `--version`, help for every option; `-e` selections
that select nothing are refused in one line, `-e trace=FUNCS` is accepted. And an event's
`time` is when the call was made, however late the tracer gets to it."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import targets as T

pytestmark = pytest.mark.live

ENGINES = [pytest.param([], id="stops"), pytest.param(["--inject"], id="inject")]


def _tracer(args: list[str], **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tracer", *args], cwd=T.REPO,
                            env=T.tracer_env(), **kw)  # type: ignore[call-overload]


def _read_lines(stream: object, n: int, timeout: float) -> list[bytes]:
    import select
    fd = stream.fileno()  # type: ignore[attr-defined]
    buf = b""
    deadline = time.monotonic() + timeout
    while buf.count(b"\n") < n:
        left = deadline - time.monotonic()
        assert left > 0, f"fewer than {n} lines within {timeout} s: {buf!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"the pipe ended after {buf!r}"
            buf += chunk
    return buf.split(b"\n")[:n]


def _head(tr: subprocess.Popen[bytes], n: int = 3) -> tuple[list[bytes], int]:
    """What `| head -N` does to the tracer: N lines read, the pipe closed; then the tracer's
    exit status (killed if it has not exited 20 s later)."""
    try:
        assert tr.stdout is not None
        lines = _read_lines(tr.stdout, n, 30)
        tr.stdout.close()
        return lines, tr.wait(timeout=20)
    finally:
        if tr.poll() is None:
            tr.kill()
            tr.wait()


def _check_unharmed(proc: T.Proc, before: bytes) -> None:
    """As test_detach: running, untraced, its vDSO as before, and its run correct to the end."""
    assert proc.popen.poll() is None, f"the tracee died ({proc.popen.returncode})"
    for tid in os.listdir(f"/proc/{proc.pid}/task"):
        assert T.tracer_pid(proc.pid, int(tid)) == 0, f"thread {tid} still traced"
    assert T.read_vdso(proc.pid) == before, "the vDSO differs from before the trace"
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    # (--inject's code page may stay, as on every way out, when a word on a thread's stack
    # could still be a return into it: test_detach's rule)
    assert "vdsotrace-ring" not in maps, maps
    time.sleep(0.2)
    assert proc.popen.stdin is not None
    proc.popen.stdin.close()
    rc, out, err = proc.finish(15)
    assert rc == 0 and "bad=0" in out, f"tracee after the trace: rc={rc} out={out!r} err={err!r}"


@pytest.mark.parametrize("where", ["stderr", "stdout"])
@pytest.mark.parametrize("engine", ENGINES)
def test_closed_pipe_ends_the_trace(target_bin, tmp_path, engine, where):
    """`trace -p PID 2>&1 | head -3` and `trace -o - -p PID | head -3`: the tracer notices the
    reader is gone, removes everything, detaches and exits 0 by itself, without noise."""
    proc = T.start(target_bin("spin"), tmp_path / "spin.jsonl", "--threads", "2")
    before = T.read_vdso(proc.pid)
    T.go(proc, close=False)
    err_path = tmp_path / "tracer.stderr"
    with open(err_path, "wb") as err:
        if where == "stderr":
            tr = _tracer(["trace", *engine, "-p", str(proc.pid)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        else:
            tr = _tracer(["trace", *engine, "-o", "-", "-p", str(proc.pid)],
                         stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
    lines, rc = _head(tr)
    assert b"vdsotrace" in lines[0], lines
    assert all(re.match(rb"\[pid \d+\] (clock_gettime|gettimeofday)\(", ln)
               for ln in lines[1:]), lines
    assert rc == 0, f"tracer exited {rc}; stderr: {err_path.read_text()!r}"
    assert err_path.read_text() == "", "noise on stderr: " + err_path.read_text()
    _check_unharmed(proc, before)


@pytest.mark.i386
def test_closed_pipe_ends_the_trace_i386(target_bin, tmp_path):
    proc = T.start(target_bin("spin", True), tmp_path / "spin.jsonl", "--threads", "2")
    before = T.read_vdso(proc.pid)
    T.go(proc, close=False)
    tr = _tracer(["trace", "-p", str(proc.pid)], stdout=subprocess.PIPE,
                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert _head(tr)[1] == 0
    _check_unharmed(proc, before)


def test_trace_goes_to_stderr_and_the_program_keeps_stdout(target_bin, tmp_path):
    """`trace -- prog > out` leaves out to prog; `-o -` puts the trace on stdout."""
    spin = target_bin("spin")
    rec = tmp_path / "spin.jsonl"
    argv = ["trace", "-e", "clock_gettime", "--", str(spin), str(rec), "--seconds", "0.1",
            "--threads", "1"]
    r = subprocess.run([sys.executable, "-m", "tracer", *argv], input=b"g", capture_output=True,
                       cwd=T.REPO, env=T.tracer_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode().splitlines()
    assert len(out) == 2 and out[0].startswith("ready ") and out[1].startswith("calls="), out
    err = r.stderr.decode()
    assert "clock_gettime(CLOCK_MONOTONIC, {tv_sec=" in err, err
    assert "+++ exited with 0 +++" in err, err

    r = subprocess.run([sys.executable, "-m", "tracer", *argv[:1], "-o", "-", *argv[1:]],
                       input=b"g", capture_output=True, cwd=T.REPO, env=T.tracer_env(),
                       timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "clock_gettime(CLOCK_MONOTONIC, {tv_sec=" in out and "ready " in out, out
    assert "clock_gettime(" not in r.stderr.decode(), r.stderr


def test_a_spawned_program_dies_of_sigpipe_as_under_a_shell(tmp_path):
    """Python ignores SIGPIPE; the program the tracer starts must not inherit that (`yes` would
    write to a closed pipe for ever)."""
    tr = _tracer(["trace", "-o", str(tmp_path / "ev"), "-e", "time", "--", "yes"],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert _head(tr)[1] == 0
    assert "+++ killed by SIGPIPE +++" in (tmp_path / "ev").read_text()


def test_version_and_help():
    r = T.run_tracer(["--version"])
    assert r.returncode == 0 and r.stdout.strip().startswith("vdsotrace "), r
    from tracer import __version__
    assert r.stdout.split() == ["vdsotrace", __version__]

    r = T.run_tracer(["--help"])
    assert r.returncode == 0
    from tracer.decoders import REGISTRY
    for func in [*REGISTRY, "__kernel_vsyscall", "__kernel_clock_gettime"]:
        assert func in r.stdout, f"{func} not in the top-level help:\n{r.stdout}"


def test_every_option_of_every_command_is_explained():
    import argparse

    from tracer.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) >= {"console", "trace", "auxv", "vdso", "dump", "disas"}
    for name, p in sub.choices.items():
        assert p.description, f"`{name} --help` has no description"
        for action in p._actions:
            assert action.help, f"`{name} --help`: {action.option_strings or action.dest} unexplained"
        r = T.run_tracer([name, "--help"])
        assert r.returncode == 0 and "usage:" in r.stdout, r


@pytest.mark.parametrize("spec", ["", ",", "clock_gettime,!clock_gettime",
                                  "__vdso_time,!time", "trace=", "trace=none", "signal=all"])
def test_selections_of_nothing_are_refused_before_anything_runs(tmp_path, spec):
    marker = tmp_path / "ran"
    r = T.run_tracer(["trace", "-e", spec, "--", "sh", "-c", f"touch {marker}"])
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdsotrace: "), r.stderr
    assert not marker.exists(), "the command ran although -e was refused"


@pytest.mark.parametrize("spec", ["trace=clock_gettime", "t=clock_gettime"])
def test_strace_qualifier_syntax_is_accepted(target_bin, tmp_path, spec):
    out = tmp_path / "ev.jsonl"
    spin = target_bin("spin")
    r = subprocess.run([sys.executable, "-m", "tracer", "trace", "--json", "-o", str(out), "-e",
                        spec, "--", str(spin), str(tmp_path / "rec"), "--seconds", "0.1",
                        "--threads", "1"], input=b"g", capture_output=True, cwd=T.REPO,
                       env=T.tracer_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    evs = T.read_events(out)
    assert evs[0]["event"] == "attach" and evs[0]["functions"] == ["clock_gettime"], evs[0]
    calls = [e for e in evs if e["event"] == "call"]
    assert calls and {e["func"] for e in calls} == {"clock_gettime"}   # spin's gettimeofday: not


@pytest.mark.parametrize("m32", [pytest.param(False, id="x86_64"),
                                 pytest.param(True, id="i386", marks=pytest.mark.i386)])
@pytest.mark.parametrize("engine", ENGINES)
def test_event_time_is_when_the_call_was_made(target_bin, tmp_path, engine, m32):
    """The tracer is frozen (SIGSTOP) while the tracee makes its call, and thawed 0.6 s later:
    the event's `time` is still the call's own (the stub's stamp), not when the tracer got to
    it. The tracee's call returned CLOCK_REALTIME, the clock `time` is on."""
    proc = T.start(target_bin("stamp", m32), tmp_path / "stamp.jsonl")
    # only the clock functions: on i386 the gateway's stop after the go byte's read() would
    # hold the tracee until the tracer thaws, and the call would come after
    funcs = "clock_gettime,clock_gettime64" if m32 else "clock_gettime"
    tr = T.run_trace(["-p", str(proc.pid), "-e", funcs, *engine], tmp_path / "ev.jsonl")
    tr.signal(signal.SIGSTOP)
    try:
        T.go(proc)
        time.sleep(0.6)
    finally:
        tr.signal(signal.SIGCONT)
    rc, _, err = proc.finish(20)
    assert rc == 0, err
    tr.wait_ok(20)
    (rec,) = T.read_record(proc.record)
    returned = rec["tv_sec"] + rec["tv_nsec"] / 1e9
    calls = [e for e in tr.events() if e["event"] == "call" and e["func"].startswith(
        "clock_gettime") and e["args"].get("clockid") == "CLOCK_REALTIME"]
    assert len(calls) == 1, calls
    ev = calls[0]
    got = ev["out"]["tp"]
    assert got["tv_sec"] + got["tv_nsec"] / 1e9 == returned, (ev, rec)
    # entered before it returned, and not 0.6 s later (a generous 0.2 s for the TSC's line)
    assert abs(ev["time"] - returned) < 0.2, (
        f"event time {ev['time']:.6f} vs the call's own {returned:.6f}: "
        f"{ev['time'] - returned:+.3f} s; {json.dumps(ev)}")


def _spawned(target_bin, tmp_path: Path, name: str, *args: str) -> Path:
    """`vdsotrace trace ARGS -o OUT -- vcalls` (its go byte on stdin); OUT."""
    out = tmp_path / name
    r = subprocess.run([sys.executable, "-m", "tracer", "trace", *args, "-o", str(out), "--",
                        str(target_bin("vcalls")), str(tmp_path / f"{name}.rec"), "--threads",
                        "2", "--rounds", "2"], input=b"g", capture_output=True, cwd=T.REPO,
                       env=T.tracer_env(), timeout=60)
    assert r.returncode == 0 and not r.stderr, r.stderr
    return out


def test_strace_text_options(target_bin, tmp_path):
    """-tt/-ttt and -r before each line, after its [pid N], as strace puts them; -q drops the
    attach and detach lines, -qq the exit lines too; -k is --stack."""
    t0 = time.time()
    lines = _spawned(target_bin, tmp_path, "tt.txt", "-tt", "-r", "-q").read_text().splitlines()
    assert lines and not [ln for ln in lines if ln.startswith("--- vdsotrace")], lines
    # (-r can be negative: a line is written when its call returns, and a call of another
    # thread that returned later may have started earlier)
    stamped = re.compile(r"^\[pid \d+\] (\d\d):(\d\d):(\d\d)\.(\d{6}) +(-?\d+\.\d{6}) (.*)$")
    calls = 0
    for ln in lines:
        m = stamped.match(ln)
        assert m, ln
        calls += bool(re.match(r"\w+\(", m.group(6)))
    assert calls >= 8 and sum("+++ exited with 0 +++" in ln for ln in lines) == 1, lines
    assert stamped.match(lines[0]).group(5) == "0.000000"            # type: ignore[union-attr]
    epoch = _spawned(target_bin, tmp_path, "ttt.txt", "-ttt", "-qq").read_text().splitlines()
    assert epoch and not [ln for ln in epoch if "+++" in ln or "--- vdsotrace" in ln], epoch
    for ln in epoch:
        m = re.match(r"^\[pid \d+\] (\d+\.\d{6}) \w+\(", ln)
        assert m and t0 <= float(m.group(1)) <= time.time(), ln
    stacked = _spawned(target_bin, tmp_path, "k.jsonl", "--json", "-k").read_text()
    evs = [json.loads(x) for x in stacked.splitlines()]
    assert all(e.get("stack") for e in evs if e["event"] == "call"), evs


@pytest.mark.parametrize("engine", ENGINES)
def test_only_failed_or_succeeded_calls(target_bin, tmp_path, engine):
    """-Z: only the calls that failed (vcalls' invalid clock ids: EINVAL); -z: only those that
    succeeded; together, every call of the full trace."""
    def calls(name: str, *args: str) -> list[dict]:
        out = _spawned(target_bin, tmp_path, name, "--json", *engine, *args)
        return [e for e in T.read_events(out) if e["event"] == "call"]
    every, ok, failed = calls("all.jsonl"), calls("z.jsonl", "-z"), calls("Z.jsonl", "-Z")
    assert failed and all(e["errno"] == "EINVAL" for e in failed), failed
    assert ok and all(e["errno"] is None for e in ok)
    assert len(ok) + len(failed) == len(every)
    assert len(failed) == sum(e["errno"] is not None for e in every)
