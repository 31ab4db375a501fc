"""The tracee survives forks, vforks, posix_spawn and execs made while it is traced (forks.c),
in both engines, with and without -f: events go on after them, and when the tracer leaves
the process's vDSO is byte for byte what it was before the attach, nothing of ours is
mapped in it, and it runs on to its own end."""
from __future__ import annotations

import os
import select
import signal
import time
from pathlib import Path

import pytest

import targets as T

pytestmark = pytest.mark.live

# generous: on a loaded machine loading the C library's symbols at attach has taken 30 s
ATTACH = 90.0
ENGINES = [pytest.param([], id="stops"), pytest.param(["-f"], id="stops-f"),
           pytest.param(["--inject"], id="inject")]


def _wait_line(proc: T.Proc, prefix: str, timeout: float) -> str:
    """The target's next stdout line starting with `prefix` (what was read is kept)."""
    assert proc.popen.stdout is not None
    fd = proc.popen.stdout.fileno()
    deadline = time.monotonic() + timeout
    while True:
        for line in proc._stdout.decode(errors="replace").splitlines(keepends=True):
            if line.startswith(prefix) and line.endswith("\n"):
                return line.strip()
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"target printed no {prefix!r} line within {timeout} s "
                        f"(stdout so far: {proc._stdout!r})")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                pytest.fail(f"target exited ({proc.popen.wait()}) before printing {prefix!r}")
            proc._stdout += chunk


def ours_mapped(pid: int) -> list[str]:
    return [ln for ln in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if "/memfd:vdsotrace" in ln]


def check_clean(pid: int, before: bytes, tr: T.Trace, code_page_may_stay: bool = False) -> None:
    """After the tracer left: alive, untraced, vDSO as before, nothing of ours mapped (but
    the recorder's code page, where allowed and the tracer said it keeps it)."""
    assert os.path.exists(f"/proc/{pid}"), f"tracee died; tracer stderr:\n{tr.stderr()}"
    assert T.tracer_pid(pid) == 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        assert T.tracer_pid(pid, int(tid)) == 0, f"thread {tid} still traced"
    after = T.read_vdso(pid)
    diff = [i for i in range(min(len(after), len(before))) if after[i] != before[i]]
    assert len(after) == len(before) and not diff, (
        f"vDSO differs after detach at {len(diff)} offsets, first {[hex(i) for i in diff[:8]]}; "
        f"tracer stderr:\n{tr.stderr()}")
    left = ours_mapped(pid)
    if code_page_may_stay and any("code page stays mapped" in e.get("message", "")
                                  for e in tr.events("notice")):
        left = [ln for ln in left if "/memfd:vdsotrace-code" not in ln]
    assert not left, left


def run_forks(target_bin, tmp_path: Path, mode: str, count: int, trace_args: list[str],
              m32: bool = False, child_calls: int = 3, after: float = 0.3,
              done_timeout: float = 120.0) -> tuple[list[dict], dict, int, T.Trace]:
    """Run forks.c traced, stop the tracer (SIGINT) once the forks are done, check the
    process is clean, let it finish; return (events, its record, done_ns, the trace)."""
    proc = T.start(target_bin("forks", m32), tmp_path / f"forks-{mode}.jsonl", "--mode", mode,
                   "--count", str(count), "--child-calls", str(child_calls))
    before = T.read_vdso(proc.pid)
    tr = T.run_trace(["-p", str(proc.pid), *trace_args], tmp_path / f"ev-{mode}.jsonl",
                     attach_timeout=ATTACH)
    T.go(proc, close=False)
    done_ns = int(_wait_line(proc, "done ", done_timeout).split()[1])
    time.sleep(after)                      # the clock threads call on after the last child
    assert proc.popen.poll() is None, (
        f"the tracee died ({proc.popen.returncode}) under the tracer; stderr:\n{tr.stderr()}")
    tr.signal(signal.SIGINT)
    tr.wait_ok(30)
    check_clean(proc.pid, before, tr)
    time.sleep(0.2)                        # untraced, on the restored vDSO
    assert proc.popen.stdin is not None
    proc.popen.stdin.close()
    rc, out, err = proc.finish(20)
    rec = T.read_record(proc.record)[-1]
    assert rc == 0, f"tracee rc={rc} out={out!r} err={err!r} record={rec}\n{tr.stderr()}"
    assert rec["bad"] == 0 and rec["children_failed"] == 0, rec
    return tr.events(), rec, done_ns, tr


def calls_after(events: list[dict], pid: int, t_ns: int) -> list[dict]:
    return [e for e in events if e["event"] == "call" and e["pid"] == pid
            and e["time"] * 1e9 > t_ns]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("m32", [pytest.param(False, id="x86_64"),
                                 pytest.param(True, id="i386", marks=pytest.mark.i386)])
def test_many_forks(target_bin, tmp_path, engine, m32):
    """Hundreds of forks during the trace: the parent's vDSO comes back byte for byte, every
    child runs its calls correctly, the parent lives on."""
    events, rec, done_ns, tr = run_forks(target_bin, tmp_path, "fork", 300, engine, m32)
    pid = next(e["pid"] for e in events if e["event"] == "attach")
    assert calls_after(events, pid, done_ns), f"no call traced after the forks\n{tr.stderr()}"
    if "-f" not in engine:
        assert {e["pid"] for e in events if e["event"] == "call"} == {pid}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["spawn", "vfork", "forkexec"])
def test_spawn_keeps_tracing(target_bin, tmp_path, engine, mode):
    """One posix_spawn / vfork+exec / fork+exec: events go on after it (the tracer is not
    blinded), and the process outlives the tracer, clean."""
    events, rec, done_ns, tr = run_forks(target_bin, tmp_path, mode, 1, engine, after=0.5)
    pid = next(e["pid"] for e in events if e["event"] == "attach")
    late = calls_after(events, pid, done_ns)
    assert len(late) >= 20, (f"{len(late)} calls traced after the {mode} "
                             f"(the target made {rec['calls_after_done']}); {tr.stderr()}")
    assert not [e for e in events if e["event"] == "notice"], tr.stderr()


@pytest.mark.parametrize("engine", ENGINES)
def test_many_spawns(target_bin, tmp_path, engine):
    events, rec, done_ns, tr = run_forks(target_bin, tmp_path, "spawn", 100, engine)
    pid = next(e["pid"] for e in events if e["event"] == "attach")
    assert calls_after(events, pid, done_ns)


@pytest.mark.parametrize("m32", [pytest.param(False, id="x86_64"),
                                 pytest.param(True, id="i386", marks=pytest.mark.i386)])
@pytest.mark.parametrize("mode", ["childloop", "ringwrite"])
def test_inject_fork_child_does_not_record(target_bin, tmp_path, mode, m32):
    """--inject: an unfollowed fork child loses the ring and the stubs at the fork (its calls
    are not in the parent's trace; writing records into the inherited ring is not
    possible), and it runs correctly."""
    events, rec, done_ns, tr = run_forks(target_bin, tmp_path, mode, 5, ["--inject"], m32,
                                         child_calls=200)
    pid = next(e["pid"] for e in events if e["event"] == "attach")
    assert rec["ring_in_child"] == 0
    tids = {e["tid"] for e in events if e["event"] == "call"}
    assert pid in tids and len(tids) == 2, f"calls of threads {tids}: only the parent's two"
    assert {e["pid"] for e in events if e["event"] == "call"} == {pid}
    assert not [e for e in events if e["event"] == "notice"], tr.stderr()


REAL = {
    # bash: $(date) forks and execs, $EPOCHREALTIME calls gettimeofday in the parent
    "bash": ["bash", "-c", 'n=0; while [ ! -e "$0" ]; do x=$(date +%s); y=$EPOCHREALTIME; '
             'n=$((n+1)); sleep 0.02; done; echo "ok $n"'],
    # Python: subprocess.run forks (or vforks: posix_spawn) and execs; time.time() reads
    # CLOCK_REALTIME through the vDSO
    "python": ["python3", "-c", 'import os, subprocess, sys, time\nn = 0\n'
               'while not os.path.exists(sys.argv[1]):\n'
               '    subprocess.run(["true"]); time.time(); n += 1; time.sleep(0.02)\n'
               'print("ok", n)'],
}


@pytest.mark.parametrize("engine", [pytest.param([], id="stops"),
                                    pytest.param(["--inject"], id="inject")])
@pytest.mark.parametrize("prog", sorted(REAL))
def test_real_forking_programs(reaper, tmp_path, prog, engine):
    """bash's $(date) loop and Python's subprocess.run loop, traced with `trace -p PID
    --duration` without -f: they run on to their own end, their vDSO as before."""
    import subprocess
    stop = tmp_path / "stop"
    argv = REAL[prog][:3] + [str(stop)] if prog == "python" else REAL[prog] + [str(stop)]
    p = reaper.add(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    deadline = time.monotonic() + 10
    while True:                  # its own image, after exec, with its vDSO mapped
        try:
            if os.readlink(f"/proc/{p.pid}/exe").endswith(("bash", "python3", "python3.11")):
                before = T.read_vdso(p.pid)
                break
        except (OSError, AssertionError):
            pass
        assert time.monotonic() < deadline, "the program did not start"
        time.sleep(0.02)
    time.sleep(0.3)
    tr = T.run_trace(["-p", str(p.pid), "--duration", "1.5", "-c", *engine],
                     tmp_path / "ev.jsonl", attach_timeout=ATTACH)
    tr.wait_ok(30)
    check_clean(p.pid, before, tr)
    summary = [e for e in tr.events() if e["event"] == "summary"]
    calls = sum(r["calls"] for s in summary for r in s["functions"])
    time.sleep(0.3)              # untraced, forking on
    stop.touch()
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and out.startswith(b"ok "), (p.returncode, out, err, tr.stderr())
    assert summary and calls > 0, f"no call counted: {summary}"


@pytest.mark.parametrize("engine", ENGINES)
def test_leave_during_vfork(target_bin, tmp_path, engine):
    """The tracer is told to leave while a thread waits in vfork (it cannot be stopped until
    its child execs): it leaves, promptly, and the process is clean and lives on."""
    proc = T.start(target_bin("forks"), tmp_path / "forks.jsonl", "--mode", "vforkslow",
                   "--child-calls", "1500")
    before = T.read_vdso(proc.pid)
    tr = T.run_trace(["-p", str(proc.pid), *engine], tmp_path / "ev.jsonl", attach_timeout=ATTACH)
    T.go(proc, close=False)
    _wait_line(proc, "vforking", 30)
    time.sleep(0.2)                        # the child spins for 1.5 s before its exec
    tr.signal(signal.SIGINT)
    tr.wait_ok(20)
    _wait_line(proc, "done ", 30)
    check_clean(proc.pid, before, tr)
    assert proc.popen.stdin is not None
    proc.popen.stdin.close()
    rc, out, err = proc.finish(20)
    assert rc == 0, (rc, out, err, tr.stderr())


VFORK_LOOP = ('import os, subprocess, sys, time\nn = 0\n'
              'while not os.path.exists(sys.argv[1]):\n'
              '    subprocess.run(["true"]); time.time(); n += 1\n'
              'print("ok", n)')


@pytest.mark.parametrize("engine", [pytest.param([], id="stops"),
                                    pytest.param(["--inject"], id="inject")])
def test_leave_while_vforking_back_to_back(reaper, tmp_path, engine):
    """Python's subprocess.run vforks back to back (CPython 3.10+): a vfork is made while the
    tracer stops the process to leave, and its parent cannot be stopped until the child
    execs. The tracer must still take everything out (before, --inject left its entries
    patched: 'the recorder stays in it'), every time."""
    import subprocess
    stop = tmp_path / "stop"
    p = reaper.add(subprocess.Popen(["python3", "-c", VFORK_LOOP, str(stop)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    deadline = time.monotonic() + 10
    while not os.readlink(f"/proc/{p.pid}/exe").endswith(("python3", "python3.11")):
        assert time.monotonic() < deadline, "python did not start"
        time.sleep(0.02)
    time.sleep(0.3)
    before = T.read_vdso(p.pid)
    for round_ in range(2):
        tr = T.run_trace(["-p", str(p.pid), "--duration", "0.3", "-c", *engine],
                         tmp_path / f"ev{round_}.jsonl", attach_timeout=ATTACH)
        tr.wait_ok(60)
        check_clean(p.pid, before, tr)
        notices = [e["message"] for e in tr.events() if e["event"] == "notice"]
        assert not [m for m in notices if "stays" in m], f"round {round_}: {notices}"
    stop.touch()
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and out.startswith(b"ok "), (p.returncode, out, err)


@pytest.mark.i386
@pytest.mark.parametrize("engine", [pytest.param([], id="stops")])
@pytest.mark.parametrize("m32_first", [pytest.param(True, id="i386-to-x86_64"),
                                       pytest.param(False, id="x86_64-to-i386")])
def test_exec_other_abi(target_bin, tmp_path, engine, m32_first):
    """A process execs a program of the other ABI: the new image's calls are traced exactly,
    none marked as a fallback (i386's execve, through the gateway, never returns: what it
    left per thread must not survive the exec). (--inject does not cross execve yet:
    issue 11 item 3, another branch; add it here when it does.)"""
    other = target_bin("threads", not m32_first)
    run = T.run_traced(target_bin("threads", m32_first), tmp_path,
                       ["--threads", "0", "--calls", "4", "--exec", "--exec-path", str(other)],
                       engine, tracer_timeout=60)
    pid = run.proc.pid
    execs = [i for i, e in enumerate(run.events) if e["event"] == "exec" and e["pid"] == pid]
    assert len(execs) == 1, run.trace.stderr()
    assert run.events[execs[0]]["abi"] == ("i386" if not m32_first else "x86_64")
    after = [e for e in run.events[execs[0] + 1:] if e["event"] == "call" and e["pid"] == pid]
    post = [r for r in run.record if r.get("phase") == "after-exec"]
    assert len(post) == 4 and len(after) == 4, (after, post, run.trace.stderr())
    assert [e["fallback"] for e in after] == [False] * 4, after
    if m32_first:
        T.compare_calls(after, post, "after exec")


def test_inject_foreign_records_do_not_hold_the_tracer(target_bin, tmp_path):
    """Another process floods the ring with well-formed records of a thread we do not trace
    (root reaches it through /proc/PID/map_files): the tracer still leaves within its
    --duration (every drain on the way out is bounded), and the process is clean."""
    proc = T.start(target_bin("spin"), tmp_path / "spin.jsonl", "--threads", "1")
    before = T.read_vdso(proc.pid)
    tr = T.run_trace(["-p", str(proc.pid), "--inject", "--duration", "2"], tmp_path / "ev.jsonl",
                     attach_timeout=ATTACH)
    T.go(proc, close=False)
    flood = T.start(target_bin("ringflood"), tmp_path / "flood.jsonl", str(proc.pid), "30")
    T.go(flood)
    tr.wait_ok(25)
    assert flood.popen.poll() is None, "the flooder ended before the tracer left"
    flood.popen.kill()
    # (a thread that waited in a stub for room in the ring may leave a stale return address
    # into the code page on its stack: then the page stays, said in a notice)
    check_clean(proc.pid, before, tr, code_page_may_stay=True)
    assert f'"tid": {flood.pid},' not in tr.out.read_text()   # (no event of its records)
    assert proc.popen.stdin is not None
    proc.popen.stdin.close()
    rc, out, err = proc.finish(20)
    assert rc == 0 and "bad=0" in out, (rc, out, err)
