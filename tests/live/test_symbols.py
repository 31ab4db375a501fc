"""Naming code in binaries the C targets do not cover: lld's segment layout (text whose
address differs from its file offset: every lld-linked program, every Rust program) and
mangled C++/Rust names, through `trace --stack` and `-c`."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import targets as T
from tracer.objfile import ObjectFile

SRC = Path(__file__).resolve().parent.parent / "symbol_targets"


def _build(cmd: list[str], what: str, hint: str) -> None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        pytest.fail(f"cannot build {what}: {cmd[0]} is missing ({hint})", pytrace=False)
    if r.returncode != 0:
        pytest.fail(f"cannot build {what} ({hint}): {' '.join(cmd)}:\n{r.stderr}", pytrace=False)


def _text_moved(exe: Path) -> bool:
    """Is the executable segment's address different from its file offset (the layout
    this file is about)?"""
    with open(exe, "rb") as f:
        obj = ObjectFile(f, str(exe))
    return any(s.flags & 1 and s.vaddr != s.offset for s in obj.segments)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("symbols")


@pytest.fixture(scope="module")
def lld_c(out_dir: Path) -> Path:
    exe = out_dir / "clock_caller-lld"
    _build(["gcc", "-O1", "-g", "-fuse-ld=lld", "-o", str(exe), str(SRC / "clock_caller.c")],
           "the lld-linked C target", "scripts/setup installs lld")
    assert _text_moved(exe), "lld laid the text segment at its file offset: nothing to test"
    return exe


@pytest.fixture(scope="module")
def cxx(out_dir: Path) -> Path:
    exe = out_dir / "mangled"
    _build(["g++", "-O1", "-g", "-o", str(exe), str(SRC / "mangled.cpp")],
           "the C++ target", "install g++")
    return exe


def _rustc() -> str:
    found = shutil.which("rustc") or str(Path.home() / ".cargo" / "bin" / "rustc")
    if not os.access(found, os.X_OK):
        pytest.fail("rustc is missing: install Rust (rustup) to test Rust binaries", pytrace=False)
    return found


@pytest.fixture(scope="module")
def rust(out_dir: Path) -> Path:
    exe = out_dir / "instant"
    _build([_rustc(), "-O", "-g", "-o", str(exe), str(SRC / "instant.rs")],
           "the Rust target", "rustc links with its bundled lld")
    assert _text_moved(exe), "rustc's linker laid text at its file offset: nothing to test"
    return exe


def _trace(exe: Path, tmp_path: Path, *args: str) -> list[dict[str, object]]:
    out = tmp_path / "events.jsonl"
    r = T.run_tracer(["trace", "--json", "-o", str(out), "-e", "clock_gettime", *args,
                      "--", str(exe)], timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return [ev for ev in T.read_events(out) if ev["event"] == "call"]


def _frames(ev: dict[str, object]) -> list[str]:
    stack = ev.get("stack")
    assert isinstance(stack, list), ev
    return [str(s).split(" ", 1)[1] for s in stack]


def test_lld_c_stack_names_caller_and_main(lld_c: Path, tmp_path: Path) -> None:
    calls = _trace(lld_c, tmp_path, "--stack")
    assert len(calls) == 3
    for ev in calls:
        frames = _frames(ev)
        name = lld_c.name
        assert frames[1].startswith(f"{name}!read_clock+"), frames
        assert frames[2].startswith(f"{name}!main+"), frames
        assert ev["site"] is not None and str(ev["site"]).startswith(f"{name}!read_clock+"), ev


def test_cxx_names_demangled_and_raw(cxx: Path, tmp_path: Path) -> None:
    calls = _trace(cxx, tmp_path, "--stack")
    assert len(calls) == 3
    frames = _frames(calls[0])
    assert frames[1].startswith("mangled!demo::Clock::read(int)+"), frames
    assert frames[2].startswith("mangled!long demo::sample<demo::Clock>(demo::Clock&)+"), frames
    assert frames[3].startswith("mangled!main+"), frames
    assert str(calls[0]["site"]).startswith("mangled!demo::Clock::read(int)+")
    raw = _frames(_trace(cxx, tmp_path, "--stack", "--no-demangle")[0])
    assert raw[1].startswith("mangled!_ZN4demo5Clock4readEi+"), raw


def test_cxx_summary_site_demangled(cxx: Path, tmp_path: Path) -> None:
    out = tmp_path / "summary.txt"
    r = T.run_tracer(["trace", "-c", "-o", str(out), "-e", "clock_gettime", "--", str(cxx)])
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "mangled!demo::Clock::read(int)+" in text, text


def test_rust_stack_names_timespec_now(rust: Path, tmp_path: Path) -> None:
    calls = _trace(rust, tmp_path, "--stack")
    assert len(calls) == 6
    for ev in calls:
        frames = _frames(ev)
        joined = "\n".join(frames)
        assert "Timespec>::now+" in frames[1] or "Instant>::now+" in frames[1], joined
        assert any(f.startswith("instant!instant::measure+") for f in frames), joined
        assert any(f.startswith("instant!instant::main+") for f in frames), joined
        assert "::h" not in joined and "$LT$" not in joined, joined
    raw = "\n".join(_frames(_trace(rust, tmp_path, "--stack", "--no-demangle")[0]))
    assert "instant!_ZN7instant7measure17h" in raw, raw
