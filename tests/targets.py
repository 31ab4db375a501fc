"""Harness for the live tests: build the C targets, run them, run the tracer.

The targets (tests/targets/*.c) follow one protocol: `target RECORD [args]`
sets up, prints ``ready <pid>``, blocks until one byte arrives on stdin, makes
its calls and writes what it saw to RECORD as JSON lines. The tracer is driven
only through its outside contract (docs: /work/shared/interface.md):
``python -m tracer trace ... --json -o OUT``, whose ``attach`` event is
written once every breakpoint is planted and the tracee runs.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pytest

__all__ = [
    "REPO", "SRC_DIR", "BUILD_DIR", "M32_HINT", "BuildError", "M32Unavailable",
    "build", "build_aarch64", "boot_aarch64", "Proc", "start", "go", "read_record", "Trace", "run_trace", "run_tracer",
    "read_events", "peek_events", "vdso_range", "read_vdso", "tracer_pid", "wait_traced",
    "calls_by_tid", "free_pid", "held_by", "compare_call", "compare_calls", "addr", "Reaper", "Run", "run_traced",
]

REPO = Path(__file__).resolve().parent.parent
SRC_DIR = Path(__file__).resolve().parent / "targets"
BUILD_DIR = Path(
    os.environ.get("VDSOTRACE_TARGET_DIR")
    or Path(tempfile.gettempdir()) / f"vdsotrace-targets-{os.getuid()}"
)
CFLAGS = ["-O1", "-g", "-pthread", "-Wall"]
M32_HINT = (
    "gcc -m32 cannot build the 32-bit targets here (gcc-multilib missing?): "
    "run scripts/test, which installs gcc-multilib"
)

ATTACH_TIMEOUT = 20.0


class BuildError(Exception):
    """A target did not compile."""


class M32Unavailable(BuildError):
    """gcc -m32 does not work on this machine."""


# --------------------------------------------------------------------------- build

_m32_ok: bool | None = None


def _m32_works() -> bool:
    global _m32_ok
    if _m32_ok is None:
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        src = BUILD_DIR / "m32-probe.c"
        src.write_text("#include <stdio.h>\n#include <pthread.h>\nint main(void){puts(\"\");return 0;}\n")
        r = subprocess.run(
            ["gcc", "-m32", "-pthread", "-o", str(BUILD_DIR / "m32-probe"), str(src)],
            capture_output=True, text=True,
        )
        _m32_ok = r.returncode == 0
    return _m32_ok


def build(name: str, m32: bool = False) -> Path:
    """Compile tests/targets/NAME.c (64-bit, or 32-bit with m32) and return the binary.

    Binaries live in BUILD_DIR and are rebuilt only when a source (the .c or
    common.h) is newer than the binary. Raises M32Unavailable when gcc -m32
    does not work, BuildError with gcc's message on any other failure.
    """
    src = SRC_DIR / f"{name}.c"
    if not src.exists():
        raise BuildError(f"no target source {src}")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    out = BUILD_DIR / (f"{name}-m32" if m32 else name)
    stamp = max(p.stat().st_mtime for p in (src, *SRC_DIR.glob("*.h")))
    if out.exists() and out.stat().st_mtime >= stamp:
        return out
    if m32 and not _m32_works():
        raise M32Unavailable(M32_HINT)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = ["gcc", *CFLAGS, *(["-m32"] if m32 else []), "-o", str(tmp), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"{' '.join(cmd)} failed:\n{r.stderr}")
    os.replace(tmp, out)
    return out


# arm64 targets for the emulated machine (scripts/vm aarch64), cross-compiled with clang: Debian 12's
# gcc-aarch64-linux-gnu conflicts with gcc-multilib. -mbranch-protection=standard signs return
# addresses (paciasp/autiasp) and marks BTI landing pads, as Debian's own arm64 binaries do.
AARCH64_CC = ["clang", "--target=aarch64-linux-gnu", "-fuse-ld=lld", "-mbranch-protection=standard"]
AARCH64_HINT = ("clang cannot build arm64 targets here: run scripts/setup --vm, which installs "
                "clang, lld and libc6-dev-arm64-cross")


def build_aarch64(name: str, out_name: str | None = None, *flags: str) -> Path:
    """Compile tests/targets/NAME.c for aarch64 (with extra compiler `flags` after CFLAGS)
    into BUILD_DIR/aarch64/OUT_NAME (default NAME; rebuilt when a source is newer) and return
    the binary. Raises BuildError with clang's message."""
    src = SRC_DIR / f"{name}.c"
    if not src.exists():
        raise BuildError(f"no target source {src}")
    out_dir = BUILD_DIR / "aarch64"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / (out_name or name)
    stamp = max(p.stat().st_mtime for p in (src, *SRC_DIR.glob("*.h")))
    if out.exists() and out.stat().st_mtime >= stamp:
        return out
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = [*AARCH64_CC, *CFLAGS, *flags, "-o", str(tmp), str(src)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise BuildError(AARCH64_HINT) from None
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"{' '.join(cmd)} failed ({AARCH64_HINT}):\n{r.stderr}")
    os.replace(tmp, out)
    return out



@contextlib.contextmanager
def boot_aarch64(name: str, inside: Path, prefix: str) -> Iterator[tuple[Any, Path]]:
    """One boot of the emulated arm64 machine (scripts/vm aarch64): tests/targets/NAME.c built
    for aarch64 into a fresh shared directory, `python3 INSIDE BINARY DIR` run in the machine.
    Yields what INSIDE printed (one JSON document) and the directory (removed afterwards). A
    failed build or boot fails the test with its message."""
    try:
        binary = build_aarch64(name)
    except BuildError as e:
        pytest.fail(str(e), pytrace=False)
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        work = Path(d)
        shutil.copy(binary, work / name)
        r = subprocess.run([str(REPO / "scripts" / "vm"), "aarch64", "--timeout", "600",
                            "--with", str(work), "--",
                            "python3", str(inside), str(work / name), str(work)],
                           capture_output=True, timeout=700)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        yield json.loads(r.stdout), work


# --------------------------------------------------------------------------- reaping

class Reaper:
    """Kills, at the end of a test, the processes the test started (by pid)."""

    def __init__(self) -> None:
        self._procs: list[tuple[subprocess.Popen[bytes], bool]] = []

    def add(self, p: subprocess.Popen[bytes], group: bool = False) -> subprocess.Popen[bytes]:
        self._procs.append((p, group))
        return p

    def reap(self) -> None:
        # Targets first: a tracer killed first would leave int3s in a live tracee.
        for p, group in self._procs:
            if p.poll() is None:
                try:
                    if group:
                        os.killpg(p.pid, signal.SIGKILL)
                    else:
                        p.kill()
                except ProcessLookupError:
                    pass
        for p, _ in self._procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass
        self._procs.clear()


_default_reaper: Reaper | None = None


def set_reaper(r: Reaper | None) -> None:
    global _default_reaper
    _default_reaper = r


def _track(p: subprocess.Popen[bytes], group: bool = False) -> None:
    if _default_reaper is not None:
        _default_reaper.add(p, group)


# --------------------------------------------------------------------------- targets

@dataclass
class Proc:
    """A running target that has printed its ready line."""

    popen: subprocess.Popen[bytes]
    path: Path
    record: Path
    argv: list[str]
    ready_pid: int
    _stdout: bytes = b""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def finish(self, timeout: float = 15.0) -> tuple[int, str, str]:
        """Wait for the target to exit; return (exit code, rest of stdout, stderr)."""
        if self.popen.stdin is not None and self.popen.stdin.closed:
            self.popen.stdin = None  # communicate() would flush it
        try:
            out, err = self.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            out, err = self.popen.communicate()
            pytest.fail(f"target {' '.join(self.argv)} did not exit within {timeout} s; "
                        f"stderr: {err.decode(errors='replace')!r}")
        return (self.popen.returncode, (self._stdout + out).decode(errors="replace"),
                err.decode(errors="replace"))


def start(path: Path, record: Path, *args: str, timeout: float = 10.0) -> Proc:
    """Start target PATH with RECORD and ARGS; return once it printed ``ready <pid>``."""
    argv = [str(path), str(record), *map(str, args)]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _track(p)
    assert p.stdout is not None
    fd = p.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            p.kill()
            pytest.fail(f"target {' '.join(argv)} printed no ready line within {timeout} s")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                _, err = p.communicate()
                pytest.fail(f"target {' '.join(argv)} exited ({p.returncode}) before its ready "
                            f"line; stderr: {err.decode(errors='replace')!r}")
            buf += chunk
    line, _, rest = buf.partition(b"\n")
    words = line.decode().split()
    if len(words) != 2 or words[0] != "ready" or int(words[1]) != p.pid:
        pytest.fail(f"target {' '.join(argv)}: unexpected first line {line!r}")
    return Proc(p, Path(path), Path(record), argv, int(words[1]), rest)


def go(proc: Proc, close: bool = True) -> None:
    """Write the go byte to the target's stdin (and close it, unless close=False)."""
    assert proc.popen.stdin is not None
    proc.popen.stdin.write(b"g")
    proc.popen.stdin.flush()
    if close:
        proc.popen.stdin.close()


def read_record(path: Path) -> list[dict[str, Any]]:
    """The target's record: one JSON object per line."""
    return _read_jsonl(Path(path), "record")


def _read_jsonl(path: Path, what: str, marks: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or (marks and not any(m in line for m in marks)):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            pytest.fail(f"{what} {path} line {n} is not JSON ({e}): {line!r}")
        if not isinstance(obj, dict):
            pytest.fail(f"{what} {path} line {n} is not a JSON object: {line!r}")
        rows.append(obj)
    return rows


# --------------------------------------------------------------------------- tracer

def tracer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTHONWARNINGS", None)
    return env


@dataclass
class Trace:
    """A running ``python -m tracer trace`` process."""

    popen: subprocess.Popen[bytes]
    argv: list[str]
    out: Path
    stdout_path: Path
    stderr_path: Path
    attach_time: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def describe(self) -> str:
        return f"`{' '.join(self.argv)}`"

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the tracer to exit; fail (with its stderr) if it does not in time."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            pytest.fail(f"tracer {self.describe()} did not exit within {timeout} s; "
                        f"stderr:\n{self.stderr()}")

    def wait_ok(self, timeout: float = 10.0) -> None:
        rc = self.wait(timeout)
        assert rc == 0, f"tracer {self.describe()} exited {rc}; stderr:\n{self.stderr()}"
        assert "Traceback" not in self.stderr(), self.stderr()

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def events(self, *kinds: str) -> list[dict[str, Any]]:
        """The events written (only those of the given kinds, when some are named)."""
        return read_events(self.out, *kinds)

    def count(self, kind: str) -> int:
        return count_events(self.out, kind)


def _tracer_argv(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "tracer", *map(str, args)]


def run_trace(
    args: Sequence[str],
    out: Path,
    *,
    json_events: bool = True,
    wait_attach: bool = True,
    attach_timeout: float = ATTACH_TIMEOUT,
    stdin: int | None = subprocess.DEVNULL,
) -> Trace:
    """Start ``python -m tracer trace [--json] -o OUT ARGS...``.

    With wait_attach (and json_events), return once OUT holds the `attach`
    event; fail with the tracer's stderr if it exits first or after
    attach_timeout seconds. Options go before ARGS, so ARGS may end with
    ``-- CMD ...``.
    """
    out = Path(out)
    argv = _tracer_argv(["trace", *(["--json"] if json_events else []), "-o", str(out), *args])
    stdout_path = out.with_name(out.name + ".stdout")
    stderr_path = out.with_name(out.name + ".stderr")
    with open(stdout_path, "wb") as so, open(stderr_path, "wb") as se:
        p = subprocess.Popen(argv, stdin=stdin, stdout=so, stderr=se, cwd=REPO, env=tracer_env())
    _track(p)
    t = Trace(p, argv, out, stdout_path, stderr_path)
    if wait_attach:
        if not json_events:
            raise ValueError("the attach event can be awaited only with JSON events")
        _wait_attach(t, attach_timeout)
    return t


def _marks(kinds: Sequence[str]) -> tuple[str, ...]:
    # how the tracer writes an event's kind (a string value holding the same text is
    # escaped: \"event\": \"call\" does not match)
    return tuple(f'"event": "{k}"' for k in kinds)


def count_events(path: Path, kind: str) -> int:
    """How many `kind` events have been written so far, without parsing them (a --inject
    trace of a hot loop writes hundreds of thousands of lines a second)."""
    try:
        return Path(path).read_text(errors="replace").count(_marks([kind])[0])
    except FileNotFoundError:
        return 0


def peek_events(path: Path, *kinds: str) -> list[dict[str, Any]]:
    """The events written so far (of the given kinds only, when some are named), skipping a
    line still being written."""
    evs = []
    marks = _marks(kinds)
    if Path(path).exists():
        for line in Path(path).read_text(errors="replace").splitlines():
            if marks and not any(m in line for m in marks):
                continue
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(ev, dict):
                evs.append(ev)
    return evs


def _wait_attach(t: Trace, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if any(ev.get("event") == "attach" for ev in peek_events(t.out)):
            t.attach_time = time.monotonic()
            return
        rc = t.popen.poll()
        if rc is not None:
            pytest.fail(f"tracer {t.describe()} exited {rc} before writing its attach event; "
                        f"stderr:\n{t.stderr()}")
        if time.monotonic() > deadline:
            t.popen.kill()
            t.popen.wait()
            pytest.fail(f"tracer {t.describe()} wrote no attach event to {t.out} within "
                        f"{timeout} s; stderr:\n{t.stderr()}")
        time.sleep(0.02)


def run_tracer(args: Sequence[str], timeout: float = 20.0,
               stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tracer ARGS...`` to completion (for commands that end by themselves)."""
    argv = _tracer_argv(args)
    try:
        return subprocess.run(argv, stdin=stdin, capture_output=True, text=True, cwd=REPO,
                              env=tracer_env(), timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`{' '.join(argv)}` did not exit within {timeout} s; stderr:\n{e.stderr!r}")


def read_events(path: Path, *kinds: str) -> list[dict[str, Any]]:
    """The tracer's JSON events: one object per line, each with an `event` field (every line
    checked, unless `kinds` are named: then only the lines of those kinds are read)."""
    evs = _read_jsonl(Path(path), "event file", _marks(kinds))
    for n, ev in enumerate(evs, 1):
        if "event" not in ev:
            pytest.fail(f"event {n} in {path} has no 'event' field: {ev!r}")
    return evs


# --------------------------------------------------------------------------- /proc

def held_by(debugger: str, pid: int) -> subprocess.Popen[bytes]:
    """gdb or strace attached to pid, holding it (killed with the test's reaper); the test
    fails if it has not attached within 15 s."""
    if debugger == "gdb":
        argv = ["gdb", "-q", "-nx", "-batch", "-p", str(pid), "-ex", "shell sleep 60"]
    else:
        argv = ["strace", "-p", str(pid), "-o", os.devnull]
    dbg = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    _track(dbg, group=True)
    deadline = time.monotonic() + 15
    while tracer_pid(pid) == 0:
        if time.monotonic() > deadline or dbg.poll() is not None:
            pytest.fail(f"{debugger} did not attach to {pid}")
        time.sleep(0.05)
    return dbg


def free_pid() -> int:
    """A pid no process or thread has now (the highest free one below pid_max)."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(pid_max - 1, 1, -1):
        if not Path(f"/proc/{pid}").exists():
            return pid
    raise AssertionError("no free pid")


def vdso_range(pid: int) -> tuple[int, int]:
    """[start, end) of the [vdso] mapping of PID."""
    for line in Path(f"/proc/{pid}/maps").read_text(errors="surrogateescape").split("\n"):
        if line.endswith("[vdso]"):
            lo, hi = line.split()[0].split("-")
            return int(lo, 16), int(hi, 16)
    raise AssertionError(f"process {pid} has no [vdso] mapping")


def read_vdso(pid: int) -> bytes:
    """The bytes of PID's vDSO mapping, through /proc/PID/mem."""
    lo, hi = vdso_range(pid)
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, hi - lo, lo)
    finally:
        os.close(fd)


def tracer_pid(pid: int, tid: int | None = None) -> int:
    path = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    for line in Path(path).read_text(errors="surrogateescape").split("\n"):
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no TracerPid in {path}")


def _task_states(pid: int) -> list[str]:
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text(errors="surrogateescape")
        except OSError:
            continue
        states.append(stat.rsplit(")", 1)[1].split()[0])
    return states


def wait_traced(pid: int, vdso_before: bytes, timeout: float = ATTACH_TIMEOUT,
                settle: float = 0.3) -> None:
    """For text output, which has no attach event: wait until PID is traced,
    its vDSO differs from vdso_before (breakpoints planted) and no thread is
    stopped, then wait `settle` seconds more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (tracer_pid(pid) != 0 and read_vdso(pid) != vdso_before
                    and not any(s in ("t", "T") for s in _task_states(pid))):
                time.sleep(settle)
                return
        except OSError:
            pass
        time.sleep(0.02)
    pytest.fail(f"process {pid} was not traced with breakpoints planted within {timeout} s")


# --------------------------------------------------------------------------- comparing

def addr(v: Any) -> int:
    """An address as the tracer writes it ("0x…") or the record does, as an int."""
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        return int(v.split()[0], 16)
    raise AssertionError(f"not an address: {v!r}")


def calls_by_tid(events: Iterable[dict[str, Any]], pid: int | None = None) -> dict[int, list[dict[str, Any]]]:
    """The `call` events per thread, in file order (optionally of one process only)."""
    out: dict[int, list[dict[str, Any]]] = {}
    for ev in events:
        if ev.get("event") == "call" and (pid is None or ev.get("pid") == pid):
            out.setdefault(ev["tid"], []).append(ev)
    return out


def _expected_out(rec: dict[str, Any]) -> dict[str, Any]:
    f = rec["func"]
    if f in ("clock_gettime", "clock_gettime64", "clock_getres"):
        return {"tp": {"tv_sec": rec["tv_sec"], "tv_nsec": rec["tv_nsec"]}}
    if f == "gettimeofday":
        d: dict[str, Any] = {"tv": {"tv_sec": rec["tv_sec"], "tv_usec": rec["tv_usec"]}}
        if "tz_minuteswest" in rec:
            d["tz"] = {"tz_minuteswest": rec["tz_minuteswest"], "tz_dsttime": rec["tz_dsttime"]}
        return d
    if f == "time":
        return {"tloc": rec["tloc"]}
    if f == "getcpu":
        return {"cpu": rec["cpu"], "node": rec["node"]}
    return {}


def compare_call(ev: dict[str, Any], rec: dict[str, Any]) -> list[str]:
    """Differences between one `call` event and the target's record of that call."""
    bad: list[str] = []

    def check(what: str, got: Any, want: Any) -> None:
        if got != want:
            bad.append(f"{what}: trace {got!r}, target {want!r}")

    def field_object(name: str) -> dict[str, Any]:
        value = ev.get(name)
        if isinstance(value, dict):
            return value
        bad.append(f"{name} is not an object: {value!r}")
        return {}

    check("func", ev.get("func"), rec["func"])
    if "symbol" in rec:
        check("symbol", ev.get("symbol"), rec["symbol"])
    args = field_object("args")
    if "clockid" in rec:
        check("args.clockid", args.get("clockid"), rec["clockid"])
    check("ret", ev.get("ret"), rec["ret"])
    check("fallback", ev.get("fallback"), rec["fallback"])
    if "fallback_reason" in rec:
        check("fallback_reason", ev.get("fallback_reason"), rec["fallback_reason"])
    out = field_object("out")
    want = _expected_out(rec)
    f = rec["func"]
    if f in ("clock_gettime", "clock_gettime64", "clock_getres"):
        # clock_getres's pointer is `res` in the kernel; accept either name.
        key = "res" if f == "clock_getres" and "res" in out else "tp"
        got = out.get(key)
        if rec["ret"] == 0 or isinstance(got, dict):
            # On an error nothing is written: the tracer may leave it out, give
            # the address, or read the memory (which still holds the sentinel).
            check(f"out.{key}", got, want["tp"])
    elif f == "gettimeofday":
        check("out.tv", out.get("tv"), want["tv"])
        if "tz" in want and isinstance(out.get("tz"), dict):
            check("out.tz", out.get("tz"), want["tz"])
    elif f == "time":
        if rec["tloc"] is None:
            if isinstance(out.get("tloc"), int):
                bad.append(f"out.tloc: trace {out.get('tloc')!r} for time(NULL)")
        else:
            check("out.tloc", out.get("tloc"), rec["tloc"])
    elif f == "getcpu":
        check("out.cpu", out.get("cpu"), rec["cpu"])
        check("out.node", out.get("node"), rec["node"])
    elif f == "getrandom":
        if "len" in args:
            check("args.len", args.get("len"), rec["len"])
        if isinstance(args.get("flags"), int):
            check("args.flags", args.get("flags"), rec["flags"])
    return bad


def compare_calls(events: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]],
                  label: str = "") -> None:
    """Assert that the `call` events of one thread equal its record, in order."""
    problems = []
    if len(events) != len(records):
        problems.append(f"{len(events)} call events, {len(records)} recorded calls")
    for i, (ev, rec) in enumerate(zip(events, records)):
        diffs = compare_call(ev, rec)
        if diffs:
            problems.append(f"call {i} ({rec['func']} {rec.get('clockid', '')}): " + "; ".join(diffs))
        if len(problems) > 12:
            problems.append("...")
            break
    if problems:
        head = f"{label}: " if label else ""
        shown = "\n  ".join(problems)
        raise AssertionError(
            f"{head}trace and target disagree:\n  {shown}\n"
            f"first events: {json.dumps(list(events[:3]))}\nfirst records: {json.dumps(list(records[:3]))}")


# --------------------------------------------------------------------------- one traced run

@dataclass
class Run:
    proc: Proc
    trace: Trace
    record: list[dict[str, Any]]
    events: list[dict[str, Any]]
    target_stdout: str


def run_traced(binary: Path, tmp: Path, target_args: Sequence[str] = (),
               trace_args: Sequence[str] = (), *, name: str = "run",
               target_timeout: float = 20.0, tracer_timeout: float = 10.0) -> Run:
    """Start BINARY, attach ``trace -p PID --json -o OUT TRACE_ARGS``, wait for the
    attach event, send the go byte, and wait for both to finish cleanly."""
    rec = tmp / f"{name}.record.jsonl"
    out = tmp / f"{name}.events.jsonl"
    proc = start(binary, rec, *target_args)
    tr = run_trace(["-p", str(proc.pid), *trace_args], out)
    go(proc)
    rc, so, se = proc.finish(target_timeout)
    assert rc == 0, (f"target {' '.join(proc.argv)} exited {rc} under the tracer; "
                     f"stderr: {se!r}; tracer stderr:\n{tr.stderr()}")
    tr.wait_ok(tracer_timeout)
    return Run(proc, tr, read_record(rec), tr.events(), so)


def build_aarch64_variant(name: str, variant: str, *flags: str) -> Path:
    """tests/targets/NAME.c built for aarch64 with extra compiler `flags` (after CFLAGS) into
    BUILD_DIR/aarch64/VARIANT (rebuilt when a source is newer), e.g. with and without frame
    pointers. Raises BuildError with clang's message."""
    return build_aarch64(name, variant, *flags)


# a64stack's two builds: frame records everywhere, or CFI only
A64STACK_VARIANTS = {"a64stack_fp": ("-fno-omit-frame-pointer",),
                     "a64stack_nofp": ("-fomit-frame-pointer",)}
