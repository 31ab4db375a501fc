"""The emulated arm64 machine (scripts/vm aarch64) works: it relays CMD's status, stdout and
stderr; --with DIR is shared both ways; inside, the checkout's tracer and our dependencies
import, an arm64 target built on the host runs and calls the vDSO, and ptrace attach/detach
leaves it running. The tracer's own arm64 port (issue 13) is judged by its own tests.

Deselected unless VDSOTRACE_VM=1 (tests/vm/conftest.py): each boot takes seconds of both CPUs
and the first run builds the machine (downloads, about a minute)."""
from __future__ import annotations

import re
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

import targets as T

pytestmark = pytest.mark.arm64vm

VM = T.REPO / "scripts" / "vm"
INSIDE = Path(__file__).resolve().parent / "inside_smoke.py"
EM_AARCH64 = 183
AT_SYSINFO_EHDR = 33
SVC_0 = "010000d4"  # svc #0, little-endian
NR_READ = 63  # include/uapi/asm-generic/unistd.h: __NR_read


def vm(*argv: str, with_dirs: tuple[Path, ...] = (), timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
    cmd = [str(VM), "aarch64", "--timeout", str(timeout)]
    for d in with_dirs:
        cmd += ["--with", str(d)]
    return subprocess.run([*cmd, "--", *argv], capture_output=True, timeout=timeout + 60)


@pytest.fixture(scope="module")
def smoke() -> Iterator[tuple[dict[str, Any], Path]]:
    """One boot running tests/vm/inside_smoke.py on the a64smoke target; its JSON and dir."""
    with T.boot_aarch64("a64smoke", INSIDE, "vdsotrace-vmtest-") as booted:
        yield booted


def test_status_stdout_stderr_and_shared_dir_come_back() -> None:
    with tempfile.TemporaryDirectory(prefix="vdsotrace-vmtest-") as d:
        shared = Path(d)
        (shared / "in.txt").write_text("from the host\n")
        r = vm("sh", "-c", 'cat "$1/in.txt"; echo to-stderr >&2; uname -m > "$1/out.txt"; exit 7',
               "sh", str(shared), with_dirs=(shared,))
        assert r.returncode == 7, r.stderr
        assert r.stdout == b"from the host\n"
        assert r.stderr == b"to-stderr\n"
        assert (shared / "out.txt").read_text() == "aarch64\n"


def test_checkout_and_dependencies_import(smoke: tuple[dict[str, Any], Path]) -> None:
    out, _ = smoke
    assert out["machine"] == "aarch64"
    assert out["imports"]["tracer"] == str(T.REPO / "tracer" / "__init__.py")
    for mod in ("ptrace", "capstone", "elftools"):
        assert out["imports"][mod].startswith("/usr/lib/python3/dist-packages/")


def test_target_calls_the_vdso(smoke: tuple[dict[str, Any], Path]) -> None:
    out, work = smoke
    assert out["target"]["rc"] == 0, out["target"]["stderr"]
    head, *calls = out["record"]
    assert len(calls) == 3 * (2 * 3 + 2 + 1)
    assert all(c["ret"] == 0 for c in calls)
    # The vDSO's symbols as the target found them, against objdump -T of the dumped mapping.
    lo, hi = out["vdso_range"]
    assert head["vdso"] == lo
    image = (work / "vdso.so").read_bytes()
    assert len(image) == hi - lo
    assert image[:4] == b"\x7fELF" and struct.unpack_from("<H", image, 18)[0] == EM_AARCH64
    dump = subprocess.run(["objdump", "-T", str(work / "vdso.so")], capture_output=True, text=True, check=True)
    syms = {m.group(2): int(m.group(1), 16)
            for m in re.finditer(r"^([0-9a-f]{16}) g .*LINUX_2\.6\.39\s+(__kernel_\w+)$", dump.stdout, re.M)}
    assert {"__kernel_clock_gettime", "__kernel_gettimeofday", "__kernel_clock_getres",
            "__kernel_rt_sigreturn"} <= set(syms)
    assert {k: v - lo for k, v in head["symbols"].items()} == syms
    # Each libc clock_gettime(CLOCK_MONOTONIC) comes after the direct vDSO call before it.
    mono = [(c["a"], c["b"]) for c in calls if c["func"] == "clock_gettime" and c["clockid"] == 1]
    assert mono == sorted(mono)


def test_auxv_agrees_with_the_loader(smoke: tuple[dict[str, Any], Path]) -> None:
    out, work = smoke
    raw = (work / "auxv.bin").read_bytes()
    pairs = dict(struct.iter_unpack("<QQ", raw[: len(raw) // 16 * 16]))
    assert pairs[AT_SYSINFO_EHDR] == out["vdso_range"][0]
    shown = re.search(r"^AT_SYSINFO_EHDR:\s+(0x[0-9a-f]+)$", out["ld_show_auxv"], re.M)
    assert shown and int(shown.group(1), 16) == out["vdso_range"][0]


def test_ptrace_attach_detach(smoke: tuple[dict[str, Any], Path]) -> None:
    out, _ = smoke
    pt = out["ptrace"]
    assert pt["ok"], pt.get("error")
    # Attached while blocked in read(0): the kernel rewinds pc to the svc so that the
    # interrupted read restarts; x8 still holds its number.
    assert pt["insn_at_pc"] == SVC_0
    assert pt["x8"] == NR_READ
    # After detach the target ran its calls and exited normally.
    assert out["target"]["rc"] == 0


def test_vdso_calls_make_no_system_call(smoke: tuple[dict[str, Any], Path]) -> None:
    """strace works inside, and sees the target's read of its go byte but none of its clock
    calls: the arm64 vDSO serves CLOCK_REALTIME, MONOTONIC and BOOTTIME, gettimeofday and
    clock_getres(CLOCK_MONOTONIC) in user space (lib/vdso/gettimeofday.c)."""
    out, _ = smoke
    st = out["strace"]
    assert st["rc"] == 0, st["stderr"]
    assert any(re.search(r"\bread\(0, \"g\", 1\) += 1$", line) for line in st["lines"]), st["lines"]
    assert not [line for line in st["lines"] if re.search(r"\b(clock_gettime|gettimeofday|clock_getres)\(", line)]
