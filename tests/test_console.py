"""Headless console tests: the prompt (pipe input, DummyOutput), completion, key bindings, the
dispatcher and the inspection commands on a live C target that is not traced (peek)."""
from __future__ import annotations

import os
import select
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from tracer.console.app import make_prompt, repl
from tracer.console.commands import COMMANDS, Console
from tracer.console.completion import ConsoleCompleter
from tracer.console.layout import toolbar
from tracer.console.state import Filter, history_path
from tracer.vdso import parse_image

# A target that calls clock_gettime in a loop: CLOCK_MONOTONIC every INTERVAL_US in the main
# thread (and CLOCK_PROCESS_CPUTIME_ID, which always falls back, every 50th time),
# CLOCK_REALTIME every 5 intervals in a second thread. `clockloop [INTERVAL_US [SECONDS]]`:
# prints "ready PID", exits 3 after SECONDS when given.
CLOCKLOOP_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
static long interval_us = 10000;
static void *worker(void *arg)
{
    struct timespec ts;
    (void)arg;
    for (;;) {
        clock_gettime(CLOCK_REALTIME, &ts);
        usleep(interval_us * 5);
    }
    return NULL;
}
int main(int argc, char **argv)
{
    struct timespec ts, start;
    double seconds = argc > 2 ? atof(argv[2]) : -1;
    unsigned long n = 0;
    pthread_t th;
    if (argc > 1)
        interval_us = atol(argv[1]);
    pthread_create(&th, NULL, worker, NULL);
    printf("ready %d\n", getpid());
    fflush(stdout);
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &ts);
        if (++n % 50 == 0)
            clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
        if (seconds >= 0 &&
            ts.tv_sec - start.tv_sec + (ts.tv_nsec - start.tv_nsec) / 1e9 >= seconds)
            return 3;
        usleep(interval_us);
    }
}
"""


def build_clockloop(directory: Path) -> Path:
    src = directory / "clockloop.c"
    src.write_text(CLOCKLOOP_C)
    out = directory / "clockloop"
    subprocess.run(["gcc", "-O1", "-pthread", "-Wall", "-o", str(out), str(src)], check=True,
                   capture_output=True)
    return out


@contextmanager
def running(binary: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """The target, once it has printed its ready line; killed on the way out."""
    p = subprocess.Popen([str(binary), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None
        r, _, _ = select.select([p.stdout], [], [], 10)
        assert r, "the target printed no ready line"
        assert p.stdout.readline().split() == [b"ready", str(p.pid).encode()]
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.fixture(scope="module")
def clockloop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_clockloop(tmp_path_factory.mktemp("console-target"))


@pytest.fixture
def target(clockloop: Path) -> Iterator[subprocess.Popen[bytes]]:
    with running(clockloop, "2000") as p:
        yield p


def make_console(pid: int | None = None) -> tuple[Console, list[str]]:
    lines: list[str] = []
    c = Console(lines.append, color=False)
    c.state.pid = pid          # a process known but not traced: inspection peeks at it
    return c, lines


def drive(console: Console, keys: str) -> None:
    """Type KEYS into a real prompt (pipe input, no terminal) and run what they enter."""
    with create_pipe_input() as inp:
        inp.send_text(keys)
        repl(console, make_prompt(console, input=inp, output=DummyOutput()))


def out(lines: list[str]) -> str:
    return "\n".join(lines)


# --------------------------------------------------------------------------- no process

def test_help_one_line_per_command() -> None:
    c, lines = make_console()
    c.execute("help")
    text = out(lines).splitlines()
    for spec in COMMANDS:
        assert sum(1 for ln in text if ln.startswith(spec.usage + " ")) == 1, spec.name
    for name in ("attach", "detach", "auxv", "vdso", "disas", "dump", "maps", "break",
                 "delete", "continue", "pause", "stats", "quit", "info", "x", "filter",
                 "signals", "save", "syntax", "bt", "callers", "why", "inject"):
        assert any(ln.split()[0] == name for ln in text[:-1]), name
    lines.clear()
    c.execute("help disas")
    assert lines == ["disas SYMBOL\n    disassemble one vDSO function"]


def test_errors_are_one_line_and_the_console_lives_on() -> None:
    c, lines = make_console()
    for bad in ("frobnicate", "auxv", "disas", "attach", "attach x", "attach -3",
                f"attach {os.getpid()}", "continue", "pause", "detach", "stats", "x",
                "syntax foo", "signals maybe", "filter tid", "save", "dump", "info",
                "'unclosed"):
        lines.clear()
        c.execute(bad)
        assert len(lines) == 1 and lines[0].startswith("error: "), (bad, lines)
    lines.clear()
    c.execute("help quit")
    assert lines[0].startswith("quit")
    assert not c.done


def test_explain_commands_need_a_process() -> None:
    c, lines = make_console()
    for cmd in ("bt", "callers", "why"):
        lines.clear()
        c.execute(cmd)
        assert lines == [f"error: {cmd}: nothing traced yet: `attach PID` first"]
    lines.clear()
    c.execute("inject on")
    assert lines == ["inject: on from the next attach"] and c.state.inject


def test_settings_without_a_process() -> None:
    c, lines = make_console()
    c.execute("syntax att")
    c.execute("signals on")
    c.execute("filter tid 12 13")
    c.execute("filter func clock_gettime")
    assert c.state.syntax == "att" and c.state.signals
    assert c.state.filter == Filter(frozenset({12, 13}), frozenset({"clock_gettime"}))
    c.execute("break clock_gettime __vdso_time")
    assert c.state.breaks == ["clock_gettime", "time"]
    c.execute("delete time")
    assert c.state.breaks == ["clock_gettime"]
    c.execute("filter off")
    assert not c.state.filter.active
    assert lines[-1] == "filter: off"


def test_save_without_events(tmp_path: Path) -> None:
    c, lines = make_console()
    c.execute(f"save {tmp_path / 'ev.jsonl'}")
    assert (tmp_path / "ev.jsonl").read_text() == ""
    assert lines == [f"wrote 0 events to {tmp_path / 'ev.jsonl'}"]


def test_command_completion() -> None:
    c, _ = make_console()
    comp = ConsoleCompleter(c)

    def names(text: str) -> list[str]:
        return [x.text for x in comp.get_completions(Document(text), CompleteEvent(True))]
    assert names("di") == ["disas"]
    assert names("de") == ["detach", "delete"]
    assert set(names("")) == {s.name for s in COMMANDS}
    assert names("syntax ") == ["intel", "att"]
    assert names("signals o") == ["on", "off"]
    assert names("info t") == ["threads"]
    assert names("help br") == ["break"]
    assert str(os.getppid()) in names(f"attach {os.getppid()}")


def test_history_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert history_path() == str(tmp_path / "vdsotrace" / "history")
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert history_path() == str(tmp_path / ".local" / "state" / "vdsotrace" / "history")
    monkeypatch.delenv("XDG_STATE_HOME")
    assert history_path() == str(tmp_path / ".local" / "state" / "vdsotrace" / "history")


def test_history_is_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tracer.console.app import open_history
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    c, _ = make_console()
    with create_pipe_input() as inp:
        inp.send_text("syntax att\nquit\n")
        repl(c, make_prompt(c, input=inp, output=DummyOutput(), history=open_history()))
    assert "syntax att" in (tmp_path / "vdsotrace" / "history").read_text()


def test_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    lines: list[str] = []
    c = Console(lines.append)
    c.execute("nope")
    assert "\x1b" not in out(lines)
    monkeypatch.delenv("NO_COLOR")
    lines.clear()
    Console(lines.append).execute("nope")
    assert "\x1b[31m" in out(lines)


def test_toolbar() -> None:
    c, _ = make_console()
    assert "not attached" in "".join(t for _, t in toolbar(c.state))
    st = c.state
    st.pid, st.comm, st.abi, st.attached, st.run_state = 4711, "clockloop", "x86_64", True, \
        "running"
    st.threads, st.rate, st.calls, st.fallbacks, st.breaks = 2, 123.4, 1000, 3, ["clock_gettime"]
    text = "".join(t for _, t in toolbar(st))
    for part in ("pid 4711", "x86_64", "running", "2 threads", "123 calls/s", "3 fallbacks",
                 "clock_gettime"):
        assert part in text, part
    st.run_state = "paused"
    assert "paused" in "".join(t for _, t in toolbar(st))


def test_prompt_keys_ctrl_c_ctrl_d() -> None:
    c, lines = make_console()
    # Ctrl-C drops the half-typed line (nothing attached), Ctrl-D on an empty line quits.
    drive(c, "syntax att\x03syntax intel\r\x04")
    assert lines == ["syntax: intel"]
    assert c.done


def test_prompt_tab_completes_command() -> None:
    c, lines = make_console()
    drive(c, "synt\t att\rquit\r")
    assert lines == ["syntax: att"]


# --------------------------------------------------------------------------- a live target, not traced

def test_inspection_without_tracing(target: subprocess.Popen[bytes], tmp_path: Path) -> None:
    c, lines = make_console(target.pid)
    c.execute("auxv")
    assert "AT_SYSINFO_EHDR" in out(lines)
    lines.clear()
    c.execute("vdso")
    assert "__vdso_clock_gettime" in out(lines)
    lines.clear()
    c.execute("disas clock_gettime")
    assert "syscall" in out(lines) and out(lines).startswith("__vdso_clock_gettime at 0x")
    lines.clear()
    c.execute("syntax att")
    c.execute("disas __vdso_clock_gettime")
    assert "%rbp" in out(lines)
    lines.clear()
    c.execute("maps")
    assert any("[vdso]" in ln and "<- vDSO" in ln for ln in out(lines).splitlines())
    assert any("[vvar" in ln and "unreadable" in ln for ln in out(lines).splitlines())
    lines.clear()
    c.execute("x __vdso_clock_gettime 16")
    assert len(lines) == 1 and lines[0].startswith("0x")
    lines.clear()
    c.execute(f"dump {tmp_path / 'vdso.so'}")
    assert "wrote" in lines[0]
    assert "__vdso_clock_gettime" in {s.name for s in
                                      parse_image((tmp_path / "vdso.so").read_bytes()).symbols}
    lines.clear()
    c.execute("info threads")
    assert len(lines[0].splitlines()) == 4      # header, 2 threads, footnote
    assert target.poll() is None


def test_x_reads_and_refuses(target: subprocess.Popen[bytes]) -> None:
    from tracer import procfs
    c, lines = make_console(target.pid)
    maps = procfs.read_maps(target.pid)
    vdso = next(m for m in maps if m.path == "[vdso]")
    c.execute(f"x {vdso.start:#x} 4")
    assert lines[0].split() == [f"{vdso.start:#014x}", "7f", "45", "4c", "46", ".ELF"]
    vvar = next(m for m in maps if m.path.startswith("[vvar"))
    lines.clear()
    c.execute(f"x {vvar.start:#x}")
    assert len(lines) == 1 and lines[0].startswith("error: cannot read 64 bytes")
    assert "refuses ptrace reads" in lines[0]
    lines.clear()
    c.execute("x 0x10")
    assert lines[0].startswith("error: cannot read")
    lines.clear()
    c.execute("x nosuchsym")
    assert lines[0].startswith("error: 'nosuchsym' is neither")


def test_symbol_completion_and_tab_in_the_prompt(target: subprocess.Popen[bytes]) -> None:
    c, lines = make_console(target.pid)
    c.execute("vdso")                 # reads the image: the symbols to complete
    lines.clear()
    comp = ConsoleCompleter(c)

    def names(text: str) -> list[str]:
        return [x.text for x in comp.get_completions(Document(text), CompleteEvent(True))]
    # plain and __vdso_ forms; the most used first, so Tab picks clock_gettime
    assert names("disas __vdso_clock_g") == ["__vdso_clock_gettime", "__vdso_clock_getres"]
    assert names("disas clock_g") == ["clock_gettime", "clock_getres"]
    assert "__vdso_time" in names("break ") and "all" in names("break ")
    assert "time" not in names("break clock_gettime time ")
    drive(c, "disas __vdso_clock_g\t\rquit\r")
    text = out(lines)
    assert text.startswith("__vdso_clock_gettime at 0x") and "syscall" in text
