"""Live unwinds: a breakpoint at the vDSO's clock_gettime in a real process, the stack
walked from there, compared with what the process's own backtrace() recorded."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ptrace.binding as ptrace
import pytest

from tracer.errors import MemoryReadError
from tracer.modmap import ModuleMap, parse_maps
from tracer.objfile import ObjectFile, clear_object_cache
from tracer.unwind import ReadMem, unwind

pytestmark = pytest.mark.live

TARGETS = Path(__file__).parent / "unwind_targets"

# x86_64 psABI figure 3.36 / i386 psABI table 2.14: DWARF numbers of user_regs_struct fields
# (a 32-bit tracee's registers come zero-extended in the 64-bit struct).
DWARF_X86_64 = {"rax": 0, "rdx": 1, "rcx": 2, "rbx": 3, "rsi": 4, "rdi": 5, "rbp": 6, "rsp": 7,
                **{f"r{i}": i for i in range(8, 16)}}
DWARF_I386 = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6, "rdi": 7}


@dataclass(frozen=True)
class Variant:
    abi: str
    flags: tuple[str, ...]

    @property
    def name(self) -> str:
        return "-".join([self.abi, *(f.lstrip("-") for f in self.flags)])


VARIANTS = [
    Variant(abi, (*m32, *fp, *pie))
    for abi, m32 in (("x86_64", ()), ("i386", ("-m32",)))
    for fp in ((), ("-fomit-frame-pointer",), ("-fno-omit-frame-pointer",))
    for pie in ((), ("-no-pie",))
]


def compile_target(variant: Variant, out_dir: Path) -> Path:
    exe = out_dir / f"nested_clock-{variant.name}"
    cmd = ["gcc", "-O2", *variant.flags, "-o", str(exe), str(TARGETS / "nested_clock.c")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        if variant.abi == "i386":
            pytest.fail(f"gcc -m32 unavailable (scripts/test installs gcc-multilib): "
                        f"{result.stderr.strip()[:200]}", pytrace=False)
        pytest.fail(result.stderr)
    return exe


@dataclass
class Stop:
    """What the test saw at the breakpoint, and what the target printed afterwards."""
    abi: str
    exe: Path
    entry: int
    stack: list[int]
    modules: ModuleMap
    own_backtrace: list[int]


def _mem_reader(pid: int) -> tuple[int, ReadMem]:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)

    def read_mem(addr: int, size: int) -> bytes:
        try:
            data = os.pread(fd, size, addr)
        except OSError as e:
            raise MemoryReadError(addr, size, e.strerror or "") from e
        if len(data) != size:
            raise MemoryReadError(addr, size, "short read")
        return data

    return fd, read_mem


OnStop = Callable[[dict[int | str, int], ReadMem, ModuleMap], None]


def run_to_vdso_entry(exe: Path, abi: str, depth: int = 16, args: tuple[str, ...] = (),
                      on_stop: OnStop | None = None) -> Stop:
    """Run exe to the vDSO's clock_gettime entry, unwind there (and call on_stop while the
    target is still stopped), let it finish, and collect its own backtrace()."""
    proc = subprocess.Popen([str(exe), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    ready = proc.stdout.readline().split()
    assert ready[0] == b"ready"
    pid = int(ready[1])
    attached = planted = False
    fd = -1
    entry = 0
    original = b""
    try:
        try:
            ptrace.ptrace_attach(pid)
        except Exception as e:  # python-ptrace raises its PtraceError
            pytest.fail(f"ptrace attach failed: {e}", pytrace=False)
        attached = True
        _, status = os.waitpid(pid, 0)
        assert os.WIFSTOPPED(status)

        with open(f"/proc/{pid}/maps") as f:
            regions = parse_maps(f.read())
        vdso_region = next(r for r in regions if r.path == "[vdso]")
        fd, read_mem = _mem_reader(pid)
        image = read_mem(vdso_region.start, vdso_region.end - vdso_region.start)
        vdso = ObjectFile.from_bytes(image)
        # glibc 2.36 on i386 calls the 64-bit-time entry point; x86_64 has only one.
        sym = vdso.symbol("__vdso_clock_gettime64") if abi == "i386" else None
        sym = sym or vdso.symbol("__vdso_clock_gettime")
        assert sym is not None
        bias = vdso.load_bias(vdso_region.start, vdso_region.offset)
        assert bias is not None
        entry = bias + sym.value
        original = os.pread(fd, 1, entry)
        os.pwrite(fd, b"\xcc", entry)  # int3
        planted = True

        ptrace.ptrace_cont(pid, 0)
        proc.stdin.write(b"x")
        proc.stdin.flush()
        _, status = os.waitpid(pid, 0)
        assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGTRAP, status
        uregs = ptrace.ptrace_getregs(pid)
        assert uregs.rip - 1 == entry, f"stopped at {uregs.rip:#x}, not at {entry:#x}"

        names = DWARF_X86_64 if abi == "x86_64" else DWARF_I386
        regs: dict[int | str, int] = {num: getattr(uregs, field) for field, num in names.items()}
        regs["pc"] = entry
        regs["sp"] = uregs.rsp
        modules = ModuleMap(regions, vdso_image=image, root=f"/proc/{pid}/root")
        stack = unwind(regs, read_mem, modules, abi, max_depth=depth)
        if on_stop is not None:
            on_stop(regs, read_mem, modules)

        os.pwrite(fd, original, entry)
        planted = False
        uregs.rip = entry
        ptrace.ptrace_setregs(pid, uregs)
        ptrace.ptrace_detach(pid, 0)
        attached = False
    finally:
        if planted:
            os.pwrite(fd, original, entry)
        if attached:
            ptrace.ptrace_detach(pid, 0)
        if fd >= 0:
            os.close(fd)
        if planted or attached:
            proc.kill()
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    lines = out.decode().split("\n")
    assert any(line.startswith("done") for line in lines), out
    own = [int(line.split()[1], 16) for line in lines if line.startswith("bt ")]
    return Stop(abi, exe, entry, stack, modules, own)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("unwind_targets")


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_stack_at_vdso_entry_matches_own_backtrace(variant: Variant, build_dir: Path) -> None:
    exe = compile_target(variant, build_dir)
    stop = run_to_vdso_entry(exe, variant.abi)
    modules = stop.modules
    locs = [modules.locate(a) for a in stop.stack]
    names = [loc.caller_symbol if loc else None for loc in locs]

    # innermost: the C library's clock_gettime (x86_64), or clock_gettime and
    # __clock_gettime64 (i386), then the program's f3
    exe_frames = [i for i, loc in enumerate(locs) if loc is not None and loc.short_name == exe.name]
    assert exe_frames, names
    first = exe_frames[0]
    assert 1 <= first <= 2, names
    assert all(loc is not None and loc.short_name == "libc.so.6" for loc in locs[:first]), names
    assert locs[0] is not None and locs[0].symbol in ("clock_gettime", "__clock_gettime64",
                                                      "__clock_gettime"), names

    # backtrace(): [0] into record, [1] into f3 (another call site), [2:] f2 outwards
    own = stop.own_backtrace
    assert [modules.locate(a).symbol for a in own[:5]] == ["record", "f3", "f2", "f1", "main"]  # type: ignore[union-attr]
    f3_loc = locs[first]
    assert f3_loc is not None and f3_loc.symbol == "f3"
    assert stop.stack[first + 1:] == own[2:2 + len(stop.stack) - first - 1], (
        [hex(a) for a in stop.stack], [hex(a) for a in own])
    # everything backtrace() found (up to _start) is found here too, within the depth
    assert len(stop.stack) - first - 1 >= min(len(own) - 2, 16 - first - 1)
    assert [loc.symbol for loc in locs[first:first + 4]] == ["f3", "f2", "f1", "main"]  # type: ignore[union-attr]
    entry = modules.locate(stop.stack[first])
    assert entry is not None and entry.caller_symbol is not None
    assert entry.caller_symbol.startswith(f"{exe.name}!f3+0x")
    assert entry.stack_entry == f"{stop.stack[first]:#x} {entry.caller_symbol}"


def test_depth_limit(build_dir: Path) -> None:
    exe = compile_target(Variant("x86_64", ()), build_dir)
    stop = run_to_vdso_entry(exe, "x86_64", depth=3)
    assert len(stop.stack) == 3
    assert [stop.modules.locate(a).symbol for a in stop.stack[1:]] == ["f3", "f2"]  # type: ignore[union-attr]


@pytest.mark.parametrize("abi", ["x86_64", "i386"])
def test_debug_frame_only(abi: str, build_dir: Path) -> None:
    """No .eh_frame for the program's functions (so backtrace() cannot walk them) but a
    .debug_frame, and no frame pointers: only .debug_frame finds the callers."""
    flags = ("-g", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-fomit-frame-pointer")
    exe = compile_target(Variant(abi, (("-m32",) if abi == "i386" else ()) + flags), build_dir)
    stop = run_to_vdso_entry(exe, abi)
    symbols = [loc.symbol if loc else None for loc in map(stop.modules.locate, stop.stack)]
    first = symbols.index("f3")
    assert symbols[first:first + 4] == ["f3", "f2", "f1", "main"], symbols
    assert "__libc_start_main" in symbols[first + 4:], symbols


@pytest.mark.parametrize("abi", ["x86_64", "i386"])
def test_frame_pointer_fallback_without_cfi(abi: str, build_dir: Path) -> None:
    """The program's functions have no CFI at all: their frames come from the rbp/ebp
    chain, and CFI takes over again in libc."""
    flags = ("-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-fno-omit-frame-pointer")
    exe = compile_target(Variant(abi, (("-m32",) if abi == "i386" else ()) + flags), build_dir)
    stop = run_to_vdso_entry(exe, abi)
    symbols = [loc.symbol if loc else None for loc in map(stop.modules.locate, stop.stack)]
    first = symbols.index("f3")
    assert symbols[first:first + 4] == ["f3", "f2", "f1", "main"], symbols
    if abi == "x86_64":
        assert "__libc_start_main" in symbols[first + 4:], symbols
    # On i386, gcc's main realigns the stack (`and $-16,%esp`, then pushes a copy of the
    # return address): the frame-pointer rule finds that copy, but the caller's esp it
    # derives is off by the realignment, so CFI-based frames above main cannot follow.


def test_unwind_cost(build_dir: Path, record_property: Callable[[str, object], None]) -> None:
    """A 16-frame unwind with warm caches, through /proc/PID/mem and from a copy of the
    stack (the unwinder's own cost); printed with -s, recorded as test properties, never
    asserted (speed is scripts/bench's job). What is asserted: the unwinder reads the stack
    a bounded number of times per unwind."""
    exe = compile_target(Variant("x86_64", ("-fomit-frame-pointer",)), build_dir)
    results: dict[str, float] = {}

    def measure(regs: dict[int | str, int], read_mem: ReadMem, modules: ModuleMap) -> None:
        clear_object_cache()
        cold_map = ModuleMap(modules.regions, modules.vdso_image, modules.root)
        t0 = time.perf_counter()
        stack = unwind(regs, read_mem, cold_map, "x86_64")
        results["cold_ms"] = (time.perf_counter() - t0) * 1e3
        assert len(stack) == 16

        sp = regs["sp"]
        stack_region = modules.region_at(sp)
        assert stack_region is not None
        snapshot = read_mem(sp, stack_region.end - sp)
        reads = 0

        def read_copy(addr: int, size: int) -> bytes:
            nonlocal reads
            reads += 1
            off = addr - sp
            if off < 0 or off + size > len(snapshot):
                raise MemoryReadError(addr, size, "outside the copy")
            return snapshot[off:off + size]

        assert unwind(regs, read_copy, cold_map, "x86_64") == stack
        results["reads_per_unwind"] = reads
        for name, reader in (("proc_mem_us", read_mem), ("copy_us", read_copy)):
            n = 2000
            t0 = time.perf_counter()
            for _ in range(n):
                unwind(regs, reader, cold_map, "x86_64")
            results[name] = (time.perf_counter() - t0) / n * 1e6

    run_to_vdso_entry(exe, "x86_64", args=("24",), on_stop=measure)
    for key, value in results.items():
        record_property(key, value)
    print("unwind cost (16 frames):", {k: round(v, 2) for k, v in results.items()})
    assert 0 < results["reads_per_unwind"] <= 16 * 4, results
