"""The console against the real engine (tracer.session.Session) on a live C target: the
dispatcher directly, the prompt through a pipe, and the whole program in tmux at 160x50."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from test_console import build_clockloop, running
from tracer import procfs
from tracer.console.app import make_prompt, repl
from tracer.console.commands import Console

pytestmark = pytest.mark.live
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def clockloop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_clockloop(tmp_path_factory.mktemp("console-live-target"))


def vdso_bytes(pid: int) -> bytes:
    m = next(m for m in procfs.read_maps(pid) if m.path == "[vdso]")
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(m.start)
        return f.read(m.size)


def task_states(pid: int) -> set[str]:
    return {procfs.read_stat(pid, t).state for t in procfs.list_tasks(pid)}


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_attach_break_continue_pause_stats_detach(
        clockloop: Path, console: tuple[Console, list[str]], tmp_path: Path) -> None:
    c, lines = console
    with running(clockloop, "2000") as p:
        before = vdso_bytes(p.pid)
        c.execute(f"attach {p.pid}")
        assert c.state.attached and c.state.run_state == "paused", lines
        assert task_states(p.pid) == {"t"}
        c.execute("break __vdso_clock_gettime")
        assert "clock_gettime" in c.state.breaks
        c.execute("continue")
        shown: list[str] = []

        def some_calls() -> bool:
            shown.extend(c.drain())
            return sum("clock_gettime(CLOCK_MONOTONIC" in ln for ln in shown) >= 5 and \
                any("clock_gettime(CLOCK_REALTIME" in ln for ln in shown)
        wait_for(some_calls, what="clock_gettime events")
        # the toolbar's numbers: the engine's snapshot, republished at its next tick
        wait_for(lambda: c.refresh() or c.state.calls > 0, what="a snapshot with calls")
        assert c.state.run_state == "running" and c.state.threads == 2 and c.state.calls > 0
        lines.clear()
        c.execute("pause")
        assert any(ln.startswith(f"paused {p.pid}") for ln in lines), lines  # events in flight may come first
        wait_for(lambda: task_states(p.pid) == {"t"}, what="every thread stopped")
        lines.clear()
        c.execute("stats")
        assert "clock_gettime" in lines[0]
        lines.clear()
        c.execute("info threads")
        tids = procfs.list_tasks(p.pid)
        assert all(str(t) in lines[0] for t in tids)
        # inspection goes through the engine while attached
        for cmd, want in (("auxv", "AT_SYSINFO_EHDR"), ("vdso", "__vdso_clock_gettime"),
                          ("disas clock_gettime", "syscall"), ("maps", "<- vDSO")):
            lines.clear()
            c.execute(cmd)
            assert want in lines[0] and not lines[0].startswith("error"), cmd
        lines.clear()
        c.execute(f"dump {tmp_path / 'v.so'}")
        assert (tmp_path / "v.so").read_bytes() == before   # the image without breakpoints
        # the stream filtered to the worker thread; save keeps everything
        worker = max(tids)
        c.execute(f"filter tid {worker}")
        c.execute("continue")
        shown.clear()
        wait_for(lambda: shown.extend(c.drain()) or len(shown) >= 2, what="worker events")
        assert all(f"[pid {worker}]" in ln for ln in shown)
        c.execute("pause")
        c.execute(f"save {tmp_path / 'ev.jsonl'}")
        evs = [json.loads(ln) for ln in (tmp_path / "ev.jsonl").read_text().splitlines()]
        calls = [e for e in evs if e["event"] == "call"]
        assert {e["tid"] for e in calls} == set(tids)
        assert {e["args"]["clockid"] for e in calls} >= {"CLOCK_MONOTONIC", "CLOCK_REALTIME"}
        lines.clear()
        c.execute("delete clock_gettime")
        c.execute("detach")
        assert lines[-1].startswith(f"detached from {p.pid}")
        assert not c.state.attached
        time.sleep(0.2)
        assert p.poll() is None and "t" not in task_states(p.pid)
        assert vdso_bytes(p.pid) == before
        lines.clear()
        c.execute("stats")                       # the last session's numbers stay
        assert "clock_gettime" in lines[0]


def test_tracee_exit_leaves_the_console_usable(
        clockloop: Path, console: tuple[Console, list[str]]) -> None:
    c, lines = console
    with running(clockloop, "2000", "1.0") as p:
        c.execute(f"attach {p.pid}")
        c.execute("break clock_gettime")
        c.execute("continue")

        def gone() -> bool:
            c.drain()
            c.refresh()
            return not c.state.attached
        wait_for(gone, what="the exit to be noticed")
    # (the engine, in this process, reaps its tracee: Popen cannot see the status, the
    # console can)
    assert any(ln.startswith(f"process {p.pid} exited (status 3)") for ln in lines), lines
    assert c.state.run_state == "exited"
    lines.clear()
    c.execute("continue")
    assert lines == [f"error: process {p.pid} has exited: `attach PID` first"]
    lines.clear()
    c.execute("help quit")
    assert lines[0].startswith("quit")


def test_attach_errors(clockloop: Path, console: tuple[Console, list[str]]) -> None:
    c, lines = console
    c.execute("attach 999999999")
    assert len(lines) == 1 and lines[0].startswith("error: ") and "999999999" in lines[0]
    with running(clockloop, "5000") as p:
        c.execute(f"attach {p.pid}")
        lines.clear()
        c.execute(f"attach {p.pid}")
        assert lines == [f"error: already attached to {p.pid}: `detach` first"]
        lines.clear()
        c.execute("break nosuchfunc")
        assert len(lines) == 1 and "no function 'nosuchfunc'" in lines[0]
        c.execute("quit")
        assert c.done and not c.state.attached
        assert p.poll() is None and "t" not in task_states(p.pid)


def test_ctrl_c_pauses_a_running_tracee(clockloop: Path, console: tuple[Console, list[str]]) -> None:
    c, lines = console
    with running(clockloop, "2000") as p:
        c.execute(f"attach {p.pid}")
        with create_pipe_input() as inp:
            inp.send_text("break clock_gettime\rcontinue\r")
            prompt = make_prompt(c, input=inp, output=DummyOutput())
            inp.send_text("\x03")
            inp.send_text("stats\r\x04")      # Ctrl-D: detach and leave
            repl(c, prompt)
        text = "\n".join(lines)
        assert f"continuing {p.pid}" in text and f"paused {p.pid}" in text
        assert c.done and not c.state.attached
        time.sleep(0.2)
        assert p.poll() is None and "t" not in task_states(p.pid)


# --------------------------------------------------------------------------- tmux, 160x50

class Tmux:
    def __init__(self, socket: str) -> None:
        self.socket = socket

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True,
                              capture_output=True, text=True).stdout

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "t", *keys)

    def type(self, text: str) -> None:
        self.run("send-keys", "-t", "t", "-l", text)

    def screen(self, scrollback: bool = False) -> str:
        return self.run("capture-pane", "-t", "t", "-p", *(["-S", "-"] if scrollback else []))

    def wait(self, cond: Callable[[str], bool], what: str, timeout: float = 15.0,
             scrollback: bool = False) -> str:
        deadline = time.monotonic() + timeout
        while True:
            s = self.screen(scrollback)
            if cond(s):
                return s
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; screen:\n{s}")
            time.sleep(0.1)

    def alive(self) -> bool:
        return subprocess.run(["tmux", "-L", self.socket, "has-session", "-t", "t"],
                              capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_tmux_end_to_end(clockloop: Path, tmp_path: Path) -> None:
    tm = Tmux(f"vdsotrace-test-{os.getpid()}")
    env = {"PYTHONPATH": str(REPO), "XDG_STATE_HOME": str(tmp_path / "state"),
           "TERM": "xterm-256color"}
    with running(clockloop, "20000") as p:
        before = vdso_bytes(p.pid)
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        done = tmp_path / "rc"
        cmd = (f"env {exports} {sys.executable} -m tracer console -p {p.pid}; "
               f"echo $? > {done}; sleep 30")
        tm.run("new-session", "-d", "-s", "t", "-x", "160", "-y", "50", cmd)
        try:
            tm.wait(lambda s: f"pid {p.pid}" in s, "the toolbar with the pid")
            tm.type("auxv")
            tm.keys("Enter")
            tm.wait(lambda s: "AT_SYSINFO_EHDR" in s, "auxv")
            tm.type("vdso")
            tm.keys("Enter")
            tm.wait(lambda s: "__vdso_clock_gettime" in s, "vdso")
            tm.keys("C-l")
            tm.type("disas __vdso_clock_g")
            tm.keys("Tab")
            tm.wait(lambda s: "disas __vdso_clock_gettime" in s, "Tab completion")
            tm.keys("Enter")
            # 200 lines of code: the syscall may have scrolled into tmux's history
            tm.wait(lambda s: "__vdso_clock_gettime at 0x" in s and "syscall" in s, "disas",
                    scrollback=True)
            tm.type("break clock_gettime")
            tm.keys("Enter")
            tm.type("continue")
            tm.keys("Enter")
            tm.wait(lambda s: s.count("clock_gettime(CLOCK_MONOTONIC") >= 3
                    and "clock_gettime(CLOCK_REALTIME" in s, "streamed events")
            # events stream above a half-typed line without breaking it
            tm.type("sta")
            time.sleep(0.6)
            last = [ln for ln in tm.screen().splitlines() if ln.strip()][-2]
            assert last.rstrip().endswith("sta"), tm.screen()
            tm.keys("C-c")
            tm.wait(lambda s: f"paused {p.pid}" in s, "Ctrl-C pauses")
            assert task_states(p.pid) == {"t"}
            tm.keys("C-u")                  # Ctrl-C kept the half-typed "sta": clear it
            tm.type("stats")
            tm.keys("Enter")
            screen = tm.wait(lambda s: "function" in s and "total" in s, "stats")
            print(screen)
            tm.type("detach")
            tm.keys("Enter")
            tm.wait(lambda s: f"detached from {p.pid}" in s, "detach")
            tm.type("quit")
            tm.keys("Enter")
            deadline = time.monotonic() + 10
            while not done.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert done.exists() and done.read_text().strip() == "0", tm.screen()
            time.sleep(0.3)
            assert p.poll() is None and "t" not in task_states(p.pid)
            assert vdso_bytes(p.pid) == before
            assert (tmp_path / "state" / "vdsotrace" / "history").read_text().count("+") >= 5
        finally:
            if tm.alive():
                tm.run("kill-server")
