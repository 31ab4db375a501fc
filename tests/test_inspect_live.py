"""Live tests of the inspection commands (auxv, vdso, dump, disas) on a small C target,
64- and 32-bit, compiled by a fixture, against independent oracles: /proc/PID/auxv,
/proc/PID/mem, glibc's LD_SHOW_AUXV=1 output of the same process, `file`, `objdump -T` and
`objdump -d` of the dump. And bad input to these commands: one line on stderr, non-zero exit,
no traceback (tests/live/test_bad_input.py does the same for `trace`)."""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import targets as T
from test_vdso_image import objdump_d, parse_objdump_t, same_mnemonic
from tracer.consts import HwcapX86

pytestmark = pytest.mark.live

ABIS = {False: "x86_64", True: "i386"}
WORD = {False: 8, True: 4}

# The target: the loader prints LD_SHOW_AUXV before main; main makes one vDSO call, says
# it is ready and sleeps until stdin gives a byte or closes.
SOURCE = r"""
#include <stdio.h>
#include <time.h>
#include <unistd.h>
int main(void)
{
    struct timespec ts;
    char c;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    return read(0, &c, 1) < 0;
}
"""


@pytest.fixture(scope="session")
def inspect_target() -> dict[bool, Path]:
    """The target built 64- and 32-bit (into the targets' build directory)."""
    T.BUILD_DIR.mkdir(parents=True, exist_ok=True)
    src = T.BUILD_DIR / "inspect-target.c"
    if not src.exists() or src.read_text() != SOURCE:
        src.write_text(SOURCE)
    out: dict[bool, Path] = {}
    for m32 in (False, True):
        exe = T.BUILD_DIR / ("inspect-target-m32" if m32 else "inspect-target")
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            tmp = exe.with_name(f".{exe.name}.{os.getpid()}.tmp")
            r = subprocess.run(["gcc", "-O1", *(["-m32"] if m32 else []), "-o", str(tmp),
                                str(src)], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.fail((T.M32_HINT + "\n" if m32 else "") + r.stderr, pytrace=False)
            os.replace(tmp, exe)
        out[m32] = exe
    return out


@pytest.fixture(autouse=True)
def _reap_everything(reaper: T.Reaper) -> T.Reaper:
    return reaper


@dataclass
class Target:
    popen: subprocess.Popen[bytes]
    exe: Path
    ld_show_auxv: list[tuple[str, str]]      # (name or "0x1b", value text), in order

    @property
    def pid(self) -> int:
        return self.popen.pid


def start(exe: Path, timeout: float = 10.0) -> Target:
    env = dict(os.environ, LD_SHOW_AUXV="1")
    p = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    T._track(p)
    assert p.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    while b"ready " not in buf or not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([p.stdout], [], [], left)[0]:
            pytest.fail(f"{exe} printed no ready line: {buf!r}")
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            pytest.fail(f"{exe} exited before its ready line: {buf!r}")
        buf += chunk
    shown = []
    for line in buf.decode().splitlines():
        if line.startswith("ready "):
            assert int(line.split()[1]) == p.pid
            break
        m = re.match(r"^AT_\?\?\? \((0x[0-9a-f]+)\):\s*(.*)$", line)
        if m:
            shown.append((m.group(1), m.group(2).strip()))
        else:
            name, _, value = line.partition(":")
            shown.append((name, value.strip()))
    return Target(p, exe, shown)


def tracer_ok(args: list[str]) -> str:
    r = T.run_tracer(args)
    assert r.returncode == 0 and "Traceback" not in r.stderr, \
        f"`vdsotrace {' '.join(args)}` exited {r.returncode}:\n{r.stderr}"
    return r.stdout


def proc_auxv(pid: int, word: int) -> list[tuple[int, int]]:
    out = []
    data = Path(f"/proc/{pid}/auxv").read_bytes()
    for t, v in struct.iter_unpack("<QQ" if word == 8 else "<II", data):
        if t == 0:
            break
        out.append((t, v))
    return out


def read_mem(pid: int, addr: int, size: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, size, addr)
    finally:
        os.close(fd)


def cpu_fast_syscall() -> str:
    """The IA-32 fast system call instruction the kernel patches in: sysenter on Intel,
    syscall on AMD (arch/x86/entry/vdso/vdso32/system_call.S ALTERNATIVE_2)."""
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", Path("/proc/cpuinfo").read_text(), re.M)
    return "syscall" if vendor and vendor.group(1) in ("AuthenticAMD", "HygonGenuine") \
        else "sysenter"


def objdump_t(path: Path) -> set[tuple[int, str, str]]:
    r = subprocess.run(["objdump", "-T", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    syms = {(d.value, d.version, d.name) for d in parse_objdump_t(r.stdout)}
    assert syms, r.stdout
    return syms


@pytest.fixture(scope="session", autouse=True)
def _tools() -> None:
    for tool in ("objdump", "file"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run scripts/setup", pytrace=False)


# --------------------------------------------------------------------------- auxv

@pytest.mark.parametrize("m32", [False, True], ids=["x86_64", "i386"])
def test_auxv_equals_proc_and_ld_show_auxv(inspect_target, m32):
    tg = start(inspect_target[m32])
    doc = json.loads(tracer_ok(["auxv", "-p", str(tg.pid), "--json"]))
    assert doc["pid"] == tg.pid and doc["abi"] == ABIS[m32]
    entries = doc["entries"]
    # exactly /proc/PID/auxv, in order, AT_NULL left out
    assert [(e["type"], e["value"]) for e in entries] == proc_auxv(tg.pid, WORD[m32])
    by_name = {e["name"]: e for e in entries}
    assert by_name["AT_RSEQ_FEATURE_SIZE"]["type"] == 27
    assert by_name["AT_RSEQ_ALIGN"]["type"] == 28
    assert by_name["AT_MINSIGSTKSZ"]["type"] == 51

    # glibc's view of the same vector: same order, names where glibc has them, same values
    assert len(tg.ld_show_auxv) == len(entries)
    for e, (gname, gvalue) in zip(entries, tg.ld_show_auxv):
        if gname.startswith("0x"):
            assert int(gname, 16) == e["type"] and int(gvalue, 16) == e["value"]
            assert not e["name"].startswith("AT_") or e["name"] != f"AT_{e['type']}"
            continue
        assert gname == e["name"]
        if e["name"] in ("AT_PLATFORM", "AT_EXECFN"):
            assert e["text"] == gvalue                        # the strings themselves
        elif e["name"] == "AT_HWCAP" and m32:
            assert e["text"].lower().split(" | ") == gvalue.split()
        elif e["name"] == "AT_HWCAP":
            assert int(gvalue, 16) == e["value"]
        else:
            assert int(gvalue, 0) == e["value"], (gname, gvalue)

    assert by_name["AT_EXECFN"]["text"] == str(tg.exe)        # the path given to execve
    assert by_name["AT_PLATFORM"]["text"] == ("i686" if m32 else "x86_64")
    rnd = by_name["AT_RANDOM"]
    assert rnd["text"] == read_mem(tg.pid, rnd["value"], 16).hex(" ")
    hw = by_name["AT_HWCAP"]
    names = hw["text"].split(" | ")
    assert sum(HwcapX86[n].value for n in names) == hw["value"]
    assert {"FPU", "TSC", "CX8", "SSE2"} <= set(names)
    if m32:
        assert by_name["AT_SYSINFO"]["value"] != 0
    assert T.tracer_pid(tg.pid) == 0                          # let go of it

    text = tracer_ok(["auxv", "-p", str(tg.pid)])
    assert "AT_RSEQ_FEATURE_SIZE" in text and str(tg.exe) in text and rnd["text"] in text
    tg.popen.stdin.close()
    assert tg.popen.wait(10) == 0


# --------------------------------------------------------------------------- dump, vdso

@pytest.mark.parametrize("m32", [False, True], ids=["x86_64", "i386"])
def test_dump_vdso_and_disas(inspect_target, tmp_path, m32):
    tg = start(inspect_target[m32])
    out = tmp_path / "vdso.so"
    r = T.run_tracer(["dump", "-p", str(tg.pid), "-o", str(out)])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    live = T.read_vdso(tg.pid)
    assert out.read_bytes() == live                           # byte-identical to [vdso]

    file_says = subprocess.run(["file", "-b", str(out)], capture_output=True, text=True).stdout
    assert "ELF" in file_says and "shared object" in file_says, file_says
    assert ("32-bit" if m32 else "64-bit") in file_says
    build_id = re.search(r"BuildID\[sha1\]=([0-9a-f]+)", file_says)

    theirs = objdump_t(out)
    base, end = T.vdso_range(tg.pid)
    docs = [json.loads(tracer_ok(["vdso", "-p", str(tg.pid), "--json"])),
            json.loads(tracer_ok(["vdso", "--file", str(out), "--json"]))]
    for doc in docs:
        assert {(s["value"], s["version"], s["name"]) for s in doc["symbols"]} == theirs
        assert doc["abi"] == ABIS[m32]
        if build_id:
            assert doc["build_id"] == build_id.group(1)
        if m32:
            assert doc["gateway"] == {"symbol": "__kernel_vsyscall",
                                      "instructions": [cpu_fast_syscall(), "int 0x80"]}
        else:
            assert doc["gateway"] is None
    assert docs[0]["base"] == f"{base:#x}" and docs[0]["size"] == end - base
    auxv = dict(proc_auxv(tg.pid, WORD[m32]))
    assert int(docs[0]["base"], 16) == auxv[33]                # AT_SYSINFO_EHDR
    assert docs[0]["symbols"] == docs[1]["symbols"]

    od = objdump_d(out)
    funcs = {s["name"]: s for s in docs[1]["symbols"]}
    wanted = ["__vdso_clock_gettime"] + (["__kernel_vsyscall"] if m32 else [])
    for sym in wanted:
        f = funcs[sym]
        theirs_insns = [od[a] for a in sorted(od) if f["value"] <= a < f["value"] + f["size"]]
        for args, origin in ((["-p", str(tg.pid)], base), (["--file", str(out)], 0)):
            listing = parse_disas(tracer_ok(["disas", *args, sym]))
            assert [a - origin for a, _, _ in listing] == [o.address for o in theirs_insns], sym
            for (a, mn, _), o in zip(listing, theirs_insns):
                assert same_mnemonic(mn, o), (sym, hex(a), mn, o.text)
            texts = [t for _, _, t in listing]
            if sym == "__kernel_vsyscall":
                assert cpu_fast_syscall() in texts and "int 0x80" in texts
            elif m32:
                assert any(t.startswith("call") and "<__kernel_vsyscall>" in t for t in texts)
            else:
                assert "syscall" in texts
            assert "ret" in texts
        att = parse_disas(tracer_ok(["disas", "--file", str(out), sym, "--syntax", "att"]))
        assert [a for a, _, _ in att] == [o.address for o in theirs_insns]
    assert T.tracer_pid(tg.pid) == 0
    assert T.read_vdso(tg.pid) == live                         # nothing written
    tg.popen.stdin.close()
    assert tg.popen.wait(10) == 0


def parse_disas(text: str) -> list[tuple[int, str, str]]:
    """`disas` lines `  0xADDR <+N>:\\tBYTES  mnemonic operands  <symbol>` as
    (address, mnemonic, "mnemonic operands")."""
    out = []
    for line in text.splitlines()[1:]:
        m = re.match(r"^\s+0x([0-9a-f]+) <\+\d+>:\t((?:[0-9a-f]{2} )*[0-9a-f]{2})\s+(.*?)"
                     r"(?:\s+; enters the kernel)?$", line)
        assert m, line
        ins = m.group(3).strip()
        out.append((int(m.group(1), 16), ins.split()[0], re.sub(r"\s+", " ", ins)))
    assert out, text
    return out


# --------------------------------------------------------------------------- bad input

INSPECT = {
    "auxv": lambda pid: ["auxv", "-p", pid],
    "auxv-json": lambda pid: ["auxv", "-p", pid, "--json"],
    "vdso": lambda pid: ["vdso", "-p", pid],
    "dump": lambda pid: ["dump", "-p", pid, "-o", os.devnull],
    "disas": lambda pid: ["disas", "-p", pid, "clock_gettime"],
}


def one_line_error(args: list[str]) -> str:
    r = T.run_tracer(args)
    what = "vdsotrace " + " ".join(args)
    assert r.returncode != 0, f"{what}: exit 0; stdout={r.stdout!r}"
    assert "Traceback" not in r.stderr + r.stdout, f"{what}:\n{r.stderr}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"{what}: expected one line on stderr, got:\n{r.stderr}"
    return lines[0]


@pytest.mark.parametrize("cmd", sorted(INSPECT))
def test_bad_pids(cmd):
    pid = T.free_pid()
    assert str(pid) in one_line_error(INSPECT[cmd](str(pid)))
    assert "pid" in one_line_error(INSPECT[cmd]("abc"))
    assert "pid" in one_line_error(INSPECT[cmd]("-3"))
    status = Path("/proc/2/status")
    if status.exists() and "kthreadd" in status.read_text():
        assert "kernel thread" in one_line_error(INSPECT[cmd]("2"))


def test_pid_held_by_gdb(inspect_target):
    tg = start(inspect_target[False])
    before = T.read_vdso(tg.pid)
    dbg = T.held_by("gdb", tg.pid)
    for cmd in sorted(INSPECT):
        line = one_line_error(INSPECT[cmd](str(tg.pid)))
        assert "traced" in line, line
        assert T.tracer_pid(tg.pid) == dbg.pid
    assert T.read_vdso(tg.pid) == before


def test_bad_files(tmp_path):
    fixtures = Path(__file__).resolve().parent / "fixtures"
    good = (fixtures / "vdso-x86_64.so").read_bytes()
    empty = tmp_path / "empty.so"
    empty.write_bytes(b"")
    cases = {
        "/etc/passwd": "ELF",
        str(empty): "empty",
        str(tmp_path / "missing.so"): "no such file",
        str(tmp_path): "directory",
    }
    for n in (3000, 6000, 6687):                   # cut in .text, in .shstrtab, one short
        p = tmp_path / f"cut-{n}.so"
        p.write_bytes(good[:n])
        cases[str(p)] = ""
    elf_not_vdso = Path("/bin/true")
    cases[str(elf_not_vdso)] = ""
    for path, expect in cases.items():
        for args in (["vdso", "--file", path], ["vdso", "--file", path, "--json"],
                     ["disas", "--file", path, "clock_gettime"]):
            line = one_line_error(args)
            assert expect in line, (args, line)


def test_unknown_symbol_and_unwritable_output(inspect_target, tmp_path):
    fixtures = Path(__file__).resolve().parent / "fixtures"
    line = one_line_error(["disas", "--file", str(fixtures / "vdso-i386.so"), "nope"])
    assert "nope" in line and "__kernel_vsyscall" in line
    tg = start(inspect_target[True])
    line = one_line_error(["dump", "-p", str(tg.pid), "-o", str(tmp_path / "no" / "dir")])
    assert "cannot write" in line
    assert T.tracer_pid(tg.pid) == 0
    tg.popen.stdin.close()
    assert tg.popen.wait(10) == 0
