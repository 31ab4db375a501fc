"""Names the tracee controls: mapped files and its own path with invalid UTF-8 bytes, and an
exported function whose name sets the terminal's title, clears the screen and forges a
trace line. Every command succeeds, and no text output carries a raw ESC or BEL byte or a
line the tracee wrote."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import targets as T

SRC = Path(__file__).resolve().parent.parent / "symbol_targets" / "hostile.c"
PLACEHOLDER = b"HOSTILE_NAME_PLACEHOLDER_0123456789abcdef"
EVIL = b"e\x1b]0;pwned\x07\x1b[2J\n[pid 1] forged\xff\x9b"
FORGED = b"[pid 1] forged"
DIR_NAME = b"dir\x1b]0;title\x07\x1b[2J\n[pid 1] forged dir\xff"


def _check_text(data: bytes, what: str) -> None:
    assert b"\x1b" not in data, f"{what}: a raw ESC byte:\n{data!r}"
    assert b"\x07" not in data, f"{what}: a raw BEL byte:\n{data!r}"
    for line in data.split(b"\n"):
        assert not line.startswith(FORGED), f"{what}: a forged line:\n{data!r}"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(the program, in a directory with a hostile name; two files with invalid UTF-8 in
    their names, to map)."""
    root = tmp_path_factory.mktemp("hostile")
    plain = root / "hostile"
    r = subprocess.run(["gcc", "-O1", "-rdynamic", "-o", str(plain), str(SRC)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = plain.read_bytes()
    assert data.count(PLACEHOLDER) >= 2       # .dynstr and .strtab
    evil = EVIL + b"_" * (len(PLACEHOLDER) - len(EVIL))
    d = Path(os.fsdecode(os.fsencode(root) + b"/" + DIR_NAME))
    d.mkdir()
    exe = d / "prog"
    exe.write_bytes(data.replace(PLACEHOLDER, evil))
    exe.chmod(0o755)
    maps = []
    for name in (b"map\xff\xfe\x1b[2J\n[pid 1] forged map.dat", b"mid\xff\x07\n.dat"):
        p = Path(os.fsdecode(os.fsencode(root) + b"/" + name))
        p.write_bytes(b"\x90" * 4096)
        maps.append(p)
    return exe, maps[0], maps[1]


def _start(hostile: tuple[Path, Path, Path], tmp_path: Path) -> T.Proc:
    exe, m1, m2 = hostile
    return T.start(exe, tmp_path / "rec.jsonl", str(m1), str(m2), "3")


def _attach_text(hostile: tuple[Path, Path, Path], tmp_path: Path, *args: str) -> bytes:
    proc = _start(hostile, tmp_path)
    before = T.read_vdso(proc.pid)
    out = tmp_path / "trace.txt"
    tr = T.run_trace(["-p", str(proc.pid), *args], out, json_events=False, wait_attach=False)
    T.wait_traced(proc.pid, before)
    T.go(proc)
    rc, _, err = proc.finish()
    assert rc == 0, err
    tr.wait_ok()
    assert T.read_record(tmp_path / "rec.jsonl")[0]["calls"] == 3
    return out.read_bytes() + Path(tr.stderr_path).read_bytes()


@pytest.mark.parametrize("engine", [["--stack"], ["--inject"]], ids=["stops", "inject"])
def test_attach_text_escaped(hostile: tuple[Path, Path, Path], tmp_path: Path,
                             engine: list[str]) -> None:
    data = _attach_text(hostile, tmp_path, "-e", "clock_gettime,time", *engine)
    _check_text(data, f"trace {engine[0]}")
    assert data.count(b"clock_gettime(CLOCK_MONOTONIC") == 3, data
    assert data.count(b"time(NULL)") == 1, data     # from a page mapped mid-trace
    if "--stack" in engine:     # the stack: the hostile caller, escaped
        assert b"prog!e\\33]0;pwned\\7\\33[2J\\n[pid 1] forged\\377\\233" in data, data


def test_summary_site_escaped(hostile: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data = _attach_text(hostile, tmp_path, "-e", "clock_gettime,time", "-c")
    _check_text(data, "trace -c")
    assert b"3 calls" in data and b"forged\\377" in data, data


@pytest.mark.parametrize("engine", [[], ["--inject"]], ids=["stops", "inject"])
def test_exec_path_text_and_json(hostile: tuple[Path, Path, Path], tmp_path: Path,
                                 engine: list[str]) -> None:
    exe, m1, m2 = hostile
    cmd = [str(exe), str(tmp_path / "rec.jsonl"), str(m1), str(m2), "3", "nowait"]
    # through an exec, so that the exec event names the path (--inject cannot follow an
    # exec yet, issue 11.3: it runs the program itself)
    via_exec = not engine
    if via_exec:
        cmd = ["/bin/sh", "-c", 'exec "$0" "$@"', *cmd]
    out = tmp_path / "exec.txt"
    r = T.run_tracer(["trace", "-o", str(out), "-e", "clock_gettime,time", *engine, "--", *cmd],
                     timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    data = out.read_bytes()
    _check_text(data + r.stderr.encode(errors="surrogateescape"), "trace -- (exec)")
    if via_exec:
        assert b"--- exec " in data and b"forged dir\\377/prog" in data, data
    assert data.count(b"clock_gettime(CLOCK_MONOTONIC") == 3, data
    assert data.count(b"time(NULL)") == 1, data
    jout = tmp_path / "exec.jsonl"
    r = T.run_tracer(["trace", "--json", "-o", str(jout), "-e", "clock_gettime,time", *engine,
                      "--", *cmd], timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    raw = jout.read_bytes()
    assert b"\x1b" not in raw and b"\x07" not in raw
    evs = [json.loads(line) for line in raw.decode("ascii").splitlines()]
    execs = [e for e in evs if e["event"] == "exec"]
    if via_exec:
        assert execs and os.fsencode(execs[0]["filename"]).endswith(DIR_NAME + b"/prog")
    calls = [e for e in evs if e["event"] == "call" and e["func"] == "clock_gettime"]
    assert len(calls) == 3
    assert len([e for e in evs if e["event"] == "call" and e["func"] == "time"]) == 1
    if not engine:
        assert calls[0]["site"].startswith("prog!" + os.fsdecode(EVIL))


def test_inspection_commands(hostile: tuple[Path, Path, Path], tmp_path: Path) -> None:
    proc = _start(hostile, tmp_path)
    try:
        for args in (["vdso", "-p", str(proc.pid)], ["vdso", "-p", str(proc.pid), "--json"],
                     ["auxv", "-p", str(proc.pid)], ["auxv", "-p", str(proc.pid), "--json"],
                     ["dump", "-p", str(proc.pid), "-o", str(tmp_path / "vdso.so")]):
            r = T.run_tracer(args)
            assert r.returncode == 0, (args, r.stderr)
            assert "Traceback" not in r.stderr
            _check_text((r.stdout + r.stderr).encode(errors="surrogateescape"), " ".join(args))
        r = T.run_tracer(["auxv", "-p", str(proc.pid)])
        assert "forged dir\\377/prog" in r.stdout, r.stdout
    finally:
        proc.popen.send_signal(signal.SIGKILL)


def test_console_escapes(hostile: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The console: attach (the comm in its message and toolbar), maps, info threads, the
    event stream, bt, callers, and an error naming the process."""
    from tracer.console.commands import Console
    lines: list[str] = []
    c = Console(lines.append, color=False)
    proc = _start(hostile, tmp_path)
    try:
        c.execute(f"attach {proc.pid}")
        assert c.state.attached, lines
        c.execute("maps")
        c.execute("info threads")
        c.execute("break clock_gettime")
        c.execute("continue")
        T.go(proc)
        rc, _, err = proc.finish()
        assert rc == 0, err
        shown: list[str] = []
        for _ in range(100):
            shown.extend(c.drain())
            if sum("clock_gettime(CLOCK_MONOTONIC" in ln for ln in shown) >= 3:
                break
            time.sleep(0.05)
        assert sum("clock_gettime(CLOCK_MONOTONIC" in ln for ln in shown) == 3, shown
        c.execute("bt")
        c.execute("callers")
        text = "\n".join(lines + shown + [c.state.comm])
        assert "\\33]0;t\\7\\n\\377comm" in text, text
        # the maps show the newline as \012 (and the backslash is escaped)
        assert "map\\377\\376\\33[2J\\\\012[pid 1] forged map.dat" in text, text
        assert "forged\\377\\233" in text, text           # callers: the site
        _check_text(text.encode(errors="surrogateescape"), "console")
    finally:
        c.shutdown()
        if proc.popen.poll() is None:
            proc.popen.kill()
