"""Inspection on arm64, live (issue 13 item 1): inside the emulated arm64 machine, `vdsotrace
auxv/vdso/dump/disas -p PID` on a running arm64 program (tests/targets/a64smoke.c, cross-built)
agree with the kernel's and the program's own view: /proc/PID/auxv, /proc/cpuinfo's names of
the HWCAP bits, the [vdso] mapping in /proc/PID/maps and /proc/PID/mem, the symbols the program
looked up in its vDSO, objdump -T and llvm-objdump -d of the image (run on the host). The
program then runs its calls and exits normally.

One boot for the whole module (tests/vm/inside_inspect.py); deselected unless VDSOTRACE_VM=1."""
from __future__ import annotations

import json
import re
import struct
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

import targets as T
from a64_oracles import as_cpuinfo_name, cpuinfo_features, llvm_objdump, objdump_T

pytestmark = pytest.mark.arm64vm

INSIDE = Path(__file__).resolve().parent / "inside_inspect.py"
AT_SYSINFO_EHDR, AT_HWCAP, AT_HWCAP2, AT_PLATFORM = 33, 16, 26, 15


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[dict[str, Any], Path]]:
    with T.boot_aarch64("a64smoke", INSIDE, "vdsotrace-vminspect-") as booted:
        yield booted


def ok(res: dict[str, Any]) -> str:
    assert res["rc"] == 0, (res["argv"], res["stderr"])
    assert res["stderr"] == "" or res["argv"][1] == "dump", res["stderr"]
    return str(res["stdout"])


def proc_auxv(work: Path) -> list[tuple[int, int]]:
    out = []
    for t, v in struct.iter_unpack("<QQ", (work / "auxv.bin").read_bytes()):
        if t == 0:
            return out
        out.append((t, v))
    raise AssertionError("no AT_NULL in /proc/PID/auxv")


def vdso_range(work: Path) -> tuple[int, int]:
    for line in (work / "maps.txt").read_text().splitlines():
        if line.endswith("[vdso]"):
            lo, hi = line.split()[0].split("-")
            return int(lo, 16), int(hi, 16)
    raise AssertionError("no [vdso] in maps")


def test_auxv_agrees_with_proc_auxv_and_cpuinfo(live: tuple[dict[str, Any], Path]) -> None:
    out, work = live
    doc = json.loads(ok(out["vdsotrace"]["auxv_json"]))
    assert doc["abi"] == "aarch64" and doc["pid"] == out["pid"]
    assert doc["source"] == "stack"                  # the stack copy equals /proc/PID/auxv
    assert [(e["type"], e["value"]) for e in doc["entries"]] == proc_auxv(work)
    text = {e["name"]: e["text"] for e in doc["entries"]}
    names = {as_cpuinfo_name(n) for at in ("AT_HWCAP", "AT_HWCAP2") for n in text[at].split(" | ")}
    assert names == cpuinfo_features((work / "cpuinfo.txt").read_text())
    assert text["AT_PLATFORM"] == "aarch64"
    assert text["AT_EXECFN"] == str(work / "a64smoke")
    plain = ok(out["vdsotrace"]["auxv_text"]).splitlines()
    assert plain[0] == f"auxv of pid {out['pid']} (aarch64), read from the initial stack, " \
                       f"matches /proc/{out['pid']}/auxv"
    assert any(re.match(r"^AT_HWCAP\s+FP \| ASIMD \| ", x) for x in plain)


def test_vdso_agrees_with_maps_objdump_and_the_program(live: tuple[dict[str, Any], Path]) -> None:
    out, work = live
    lo, hi = vdso_range(work)
    doc = json.loads(ok(out["vdsotrace"]["vdso_json"]))
    assert int(doc["base"], 16) == lo == dict(proc_auxv(work))[AT_SYSINFO_EHDR]
    assert doc["size"] == hi - lo and doc["abi"] == "aarch64"
    assert doc["soname"] == "linux-vdso.so.1" and doc["gateway"] is None
    dump = subprocess.run(["objdump", "-T", str(work / "vdso-mem.so")], capture_output=True,
                          text=True, check=True)
    oracle = objdump_T(dump.stdout)
    assert {s["name"]: (s["value"], s["size"], s["version"]) for s in doc["symbols"]} == oracle
    assert {v for _, _, v in oracle.values()} == {"LINUX_2.6.39"}
    funcs = {f["symbol"]: f["name"] for f in doc["functions"]}
    assert funcs == {"__kernel_clock_gettime": "clock_gettime",
                     "__kernel_gettimeofday": "gettimeofday",
                     "__kernel_clock_getres": "clock_getres",
                     "__kernel_rt_sigreturn": "__kernel_rt_sigreturn",
                     "__kernel_getrandom": "getrandom"}
    # The program's own lookup of its vDSO's symbols (dynsym, by name)
    head = out["record"][0]
    assert head["vdso"] == lo
    assert {k: v - lo for k, v in head["symbols"].items()} == \
        {k: oracle[k][0] for k in head["symbols"]}
    assert set(head["symbols"]) == set(funcs)
    text = ok(out["vdsotrace"]["vdso_text"]).splitlines()
    assert text[0] == f"linux-vdso.so.1 (aarch64) at {lo:#x}, {hi - lo} bytes mapped, " \
                      f"{doc['image_size']} bytes of image"


def test_dump_is_the_mapping_byte_for_byte(live: tuple[dict[str, Any], Path]) -> None:
    out, work = live
    res = out["vdsotrace"]["dump"]
    ok(res)
    lo, hi = vdso_range(work)
    assert res["stderr"].strip() == f"wrote {hi - lo} bytes of linux-vdso.so.1 (aarch64) from " \
                                    f"{lo:#x} to {work / 'vdso-dump.so'}"
    assert (work / "vdso-dump.so").read_bytes() == (work / "vdso-mem.so").read_bytes()


_DISAS = re.compile(r"^  0x([0-9a-f]+) <\+(\d+)>:\t((?:[0-9a-f]{2} ){3}[0-9a-f]{2})\s+(\S+)"
                    r"(?: (.*?))?(?:  <([^>]+)>)?(   ; enters the kernel)?$")


def test_disas_agrees_with_llvm_objdump(live: tuple[dict[str, Any], Path]) -> None:
    out, work = live
    lo, _ = vdso_range(work)
    od = llvm_objdump(work / "vdso-mem.so", lo)
    doc = json.loads(ok(out["vdsotrace"]["vdso_json"]))
    by_name = {f["name"]: f for f in doc["functions"]} | {f["symbol"]: f for f in doc["functions"]}
    for name, res in out["vdsotrace"]["disas"].items():
        f = by_name[name]
        lines = ok(res).splitlines()
        assert lines[0] == f"{f['symbol']} at {lo + f['value']:#x}:"
        body = [_DISAS.match(x) for x in lines[1:]]
        assert all(body), [x for x, m in zip(lines[1:], body) if not m]
        addrs = [int(m.group(1), 16) for m in body if m]
        assert addrs == list(range(lo + f["value"], lo + f["value"] + f["size"], 4)), name
        for m in body:
            assert m is not None
            o = od[int(m.group(1), 16)]
            assert bytes.fromhex(m.group(3)) == o.raw
            assert o.same_mnemonic(m.group(4)), (m.group(0), o)
            assert bool(m.group(7)) == (o.mnemonic == "svc"), m.group(0)
            t = o.target
            if t is not None and lo + f["value"] <= t[0] < lo + f["value"] + f["size"]:
                assert m.group(5).endswith(f"#{t[0]:#x}") and m.group(6) == t[1], (m.group(0), o)
    # --syntax: arm64 has one assembly syntax; att is accepted and changes nothing
    assert ok(out["vdsotrace"]["disas_att"]) == ok(out["vdsotrace"]["disas"]["clock_gettime"])
    bad = out["vdsotrace"]["disas_unknown"]
    assert bad["rc"] != 0 and bad["stderr"].count("\n") == 1
    assert bad["stderr"].startswith("vdsotrace: no function 'time' in this vDSO")


def test_inject_attaches_and_leaves(live: tuple[dict[str, Any], Path]) -> None:
    """`trace`/`record --inject` on an arm64 process (idle: nothing to record) and on a
    command: each installs the in-tracee recorder, leaves after its --duration (or with the
    command), exits 0 with no traceback, and writes what it was asked to."""
    out, _ = live
    for key in ("trace", "trace_out", "record", "trace_cmd"):
        res = out["vdsotrace"][key]
        assert res["rc"] == 0, (res["argv"], res["stderr"])
        assert "Traceback" not in res["stderr"], (res["argv"], res["stderr"])
    assert out["left_behind"] == ["spawned", "trace-out.txt", "trace.rec"]


def test_the_program_was_left_as_it_was(live: tuple[dict[str, Any], Path]) -> None:
    """After all of the above, `trace`/`record --inject -p` included, the program is
    untraced, its vDSO as it was, and it runs its calls."""
    out, _ = live
    assert out["status_after"]["TracerPid"] == "0"
    assert out["vdso_unchanged"]
    assert out["target"]["rc"] == 0, out["target"]["stderr"]
    calls = out["record"][1:]
    assert len(calls) == 3 * (2 * 3 + 2 + 1) and all(c["ret"] == 0 for c in calls)
