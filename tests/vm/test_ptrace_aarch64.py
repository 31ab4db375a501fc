"""The ptrace layer on arm64, live (issue 13 item 2): inside the emulated arm64 machine,
tracer.target attaches to an arm64 program (tests/targets/a64brk.c) whose
__kernel_clock_gettime is hot (20000 calls), reads its registers through
PTRACE_GETREGSET(NT_PRSTATUS) and its PAC mask (NT_ARM_PAC_MASK), plants `brk #0` on the
function's entry through /proc/PID/mem, and at the SIGTRAP stop finds pc AT the brk with the
call's arguments in x0/x1 and the return address in x30; writes the instruction back, changes
x0 through PTRACE_SETREGSET; then, through PTRACE_SYSCALL, changes a system call's number with
NT_ARM_SYSTEM_CALL (a changed x8 does nothing); detaches. The program's record shows the call
ran with the changed argument, the 20000 calls after it ran normally, the system calls it
really got, and that it exited 0.

One boot for the module (tests/vm/inside_ptrace.py); deselected unless VDSOTRACE_VM=1."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Iterator

import pytest

import targets as T

pytestmark = pytest.mark.arm64vm

INSIDE = Path(__file__).resolve().parent / "inside_ptrace.py"
BRK_0 = "000020d4"      # brk #0, little-endian
SVC_0 = "010000d4"      # svc #0
NR_READ = 63            # include/uapi/asm-generic/unistd.h
PRSTATUS_BYTES = 34 * 8  # struct user_pt_regs: x0-x30, sp, pc, pstate


@pytest.fixture(scope="module")
def run() -> Iterator[dict[str, Any]]:
    with T.boot_aarch64("a64brk", INSIDE, "vdsotrace-vmptrace-") as (out, _):
        assert "error" not in out, out["error"]
        yield out


def mapping_of(out: dict[str, Any], addr: int) -> str:
    for line in out["maps"].splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= addr < hi:
            return line
    raise AssertionError(f"{addr:#x} is not mapped")


def test_registers_through_nt_prstatus(run: dict[str, Any]) -> None:
    assert run["prstatus_bytes"] == PRSTATUS_BYTES
    # Attached while blocked in read(0): pc rewound to the svc for the restart, x8 its number
    assert run["attach"]["insn_at_pc"] == SVC_0
    assert run["attach"]["x8"] == NR_READ
    assert "[stack]" in mapping_of(run, run["attach"]["sp"])


def test_pac_mask(run: dict[str, Any]) -> None:
    data_mask, insn_mask = run["pac_mask"]
    assert insn_mask and data_mask == insn_mask
    assert insn_mask & ((1 << 48) - 1) == 0          # only bits above the 48-bit address
    assert insn_mask >> 55 & 1 == 0                  # bit 55 selects the half: never a PAC bit


def test_brk_stops_at_itself_with_the_calls_registers(run: dict[str, Any]) -> None:
    assert run["planted"] == BRK_0
    assert run["stop"] == {"tid": run["pid"], "stopped": True, "sig": signal.SIGTRAP, "event": 0}
    at = run["at_brk"]
    assert at["pc"] == run["entry"]                  # not past it, unlike x86's int3
    assert at["insn_at_pc"] == BRK_0
    assert at["x0"] == 0                             # CLOCK_REALTIME, the probe call's clock
    assert "[stack]" in mapping_of(run, at["x1"])    # &ts, on main's stack
    assert mapping_of(run, at["x30"]).endswith("/a64brk")   # returns into main
    assert "r-xp" in mapping_of(run, at["x30"])


def test_instruction_restored_and_registers_written(run: dict[str, Any]) -> None:
    assert run["restored"] and run["image_restored"]
    assert run["after_setregs"] == {"pc": run["entry"], "x0": 1, "same_otherwise": True}
    assert run["detached"]


def test_the_program_ran_on_with_what_we_wrote(run: dict[str, Any]) -> None:
    assert run["target"]["rc"] == 0, run["target"]["stderr"]
    rec = run["record"]
    assert rec["entry"] == run["entry"]
    # It asked for CLOCK_REALTIME (about 1.8e9 s here) and got CLOCK_MONOTONIC (the machine's
    # uptime): the x0 written through PTRACE_SETREGSET is what the function ran with.
    assert run["realtime"] > 1e9
    assert rec["probe"]["ret"] == 0 and 0 <= rec["probe"]["sec"] < 100000
    # The original instruction ran from then on (a stale brk in the instruction cache would
    # have killed it with SIGTRAP once detached): 20000 more calls, all fine.
    assert rec["after"] == {"calls": 20000, "failed": 0, "backwards": 0}
    assert rec["before"] == {"calls": 20000, "failed": 0, "backwards": 0}


NR_GETPPID, NR_GETPID = 173, 172     # include/uapi/asm-generic/unistd.h


def test_syscall_number_changes_only_through_nt_arm_system_call(run: dict[str, Any]) -> None:
    """At a syscall-entry stop the kernel runs regs->syscallno, which NT_ARM_SYSTEM_CALL
    reads and writes; x8 is only what the program passed (a changed x8 changes nothing).
    x7 reads 0 at entry stops and 1 at exit stops (the kernel's marker; the program's x7 is
    put back)."""
    stops = run["syscalls"]
    entries = [s for s in stops if s["op"] == 1]
    exits = [s for s in stops if s["op"] == 2]
    assert entries and exits and all(s["op"] in (1, 2) for s in stops)
    for s in entries:
        assert s["x7"] == 0 and s["system_call"] == s["nr"] == s["x8"], s
    for s in exits:
        assert s["x7"] == 1, s
    first, second = [s for s in entries if s["nr"] == NR_GETPPID]
    assert first["changed"] == "x8" and first["system_call_after"] == NR_GETPPID
    assert second["changed"] == "NT_ARM_SYSTEM_CALL" and second["system_call_after"] == NR_GETPID
    rec = run["record"]
    assert rec["pid"] == run["pid"] and rec["ppid"] != rec["pid"]
    # the first call still ran getppid; the second ran getpid
    assert rec["getppid"] == [rec["ppid"], rec["pid"]]
    # each exit stop shows the result the program recorded
    assert [s["x0"] for s in exits][-2:] == [rec["ppid"], rec["pid"]]
