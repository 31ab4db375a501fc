"""tracer.tables against sources independent of scripts/gen-tables' parsing.

System call numbers are compared with what gcc and glibc's <sys/syscall.h> compile
to (for i386 with gcc -m32, run as a 32-bit program), errno and signal numbers with
Python's errno and signal modules, signal names with strace itself; and the
generator must reproduce the checked-in files byte for byte.
"""

from __future__ import annotations

import errno
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tracer.tables import errnos, signals, syscalls_aarch64, syscalls_i386, syscalls_x86_64
from tracer.tables.errnos import Errno
from tracer.tables.signals import Signal, signame

REPO = Path(__file__).resolve().parent.parent
GENERATOR = REPO / "scripts" / "gen-tables"
TABLES = REPO / "tracer" / "tables"
HEADERS = [
    Path("/usr/include/x86_64-linux-gnu/asm/unistd_32.h"),
    Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    Path("/usr/include/asm-generic/errno-base.h"),
    Path("/usr/include/asm-generic/errno.h"),
    Path("/usr/include/x86_64-linux-gnu/asm/signal.h"),
]

# A pid above the largest pid_max (2**22, include/linux/threads.h): kill() on it
# fails with ESRCH and never signals anything.
NO_SUCH_PID = 2**22 + 1


# --- system calls -------------------------------------------------------------


@pytest.mark.parametrize(
    ("nr", "name"),
    [
        (0, "restart_syscall"),
        (90, "mmap"),
        (102, "socketcall"),
        (119, "sigreturn"),
        (140, "_llseek"),
        (142, "_newselect"),
        (173, "rt_sigreturn"),
        (192, "mmap2"),
        (199, "getuid32"),
        (265, "clock_gettime"),
        (383, "statx"),
        (403, "clock_gettime64"),
    ],
)
def test_i386_names(nr: int, name: str) -> None:
    assert syscalls_i386.NAMES[nr] == name
    assert syscalls_i386.NUMBERS[name] == nr


@pytest.mark.parametrize(
    ("nr", "name"),
    [
        (0, "read"),
        (15, "rt_sigreturn"),
        (96, "gettimeofday"),
        (201, "time"),
        (228, "clock_gettime"),
        (229, "clock_getres"),
        (309, "getcpu"),
        (318, "getrandom"),
        (332, "statx"),
    ],
)
def test_x86_64_names(nr: int, name: str) -> None:
    assert syscalls_x86_64.NAMES[nr] == name
    assert syscalls_x86_64.NUMBERS[name] == nr


@pytest.mark.parametrize(
    ("name", "nargs"),
    [
        ("getuid32", 0),
        ("rt_sigreturn", 0),
        ("sigreturn", 0),
        ("socketcall", 2),
        ("mmap", 1),  # old_mmap: one pointer to struct mmap_arg_struct
        ("select", 1),  # old_select
        ("mmap2", 6),
        ("_llseek", 5),
        ("pread64", 5),  # the 64-bit offset takes two registers
        ("clock_gettime", 2),
        ("clock_gettime64", 2),
        ("ipc", 6),
    ],
)
def test_i386_nargs(name: str, nargs: int) -> None:
    assert syscalls_i386.NARGS[syscalls_i386.NUMBERS[name]] == nargs


@pytest.mark.parametrize(
    ("name", "nargs"),
    [
        ("rt_sigreturn", 0),
        ("mmap", 6),
        ("pread64", 4),
        ("clock_gettime", 2),
        ("gettimeofday", 2),
        ("time", 1),
        ("getcpu", 3),
        ("getrandom", 3),
        ("membarrier", 3),
        ("arch_prctl", 2),
    ],
)
def test_x86_64_nargs(name: str, nargs: int) -> None:
    assert syscalls_x86_64.NARGS[syscalls_x86_64.NUMBERS[name]] == nargs


@pytest.mark.parametrize("table", [syscalls_i386, syscalls_x86_64, syscalls_aarch64])
def test_tables_are_whole_and_sorted(table: object) -> None:
    names: dict[int, str] = table.NAMES  # type: ignore[attr-defined]
    nargs: dict[int, int] = table.NARGS  # type: ignore[attr-defined]
    assert list(names) == sorted(names)
    assert list(nargs) == list(names)
    assert all(0 <= n <= 6 for n in nargs.values())
    assert len(set(names.values())) == len(names)


def compiled_syscall_numbers(tmp_path: Path, flag: str) -> dict[int, str]:
    """Every SYS_<name> glibc's <sys/syscall.h> defines, as gcc `flag` compiles it.

    The names come from the preprocessor, the numbers from running the compiled
    program, so neither goes through the generator's reading of the headers.
    """
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is not installed (scripts/test installs it)")
    listing = subprocess.run(
        [gcc, flag, "-dM", "-E", "-include", "sys/syscall.h", "-"],
        input="",
        capture_output=True,
        text=True,
    )
    if listing.returncode != 0:
        pytest.fail(f"gcc {flag} cannot preprocess (scripts/test installs gcc-multilib): "
                    f"{listing.stderr.strip()}")
    sys_names = sorted(set(re.findall(r"^#define SYS_(\w+) ", listing.stdout, re.M)))
    assert len(sys_names) > 300

    source = tmp_path / f"sysnr{flag}.c"
    source.write_text(
        "#include <stdio.h>\n#include <sys/syscall.h>\nint main(void)\n{\n"
        + "".join(f'\tprintf("%ld {n}\\n", (long)SYS_{n});\n' for n in sys_names)
        + "\treturn 0;\n}\n"
    )
    exe = tmp_path / f"sysnr{flag}"
    build = subprocess.run(
        [gcc, flag, "-o", str(exe), str(source)], capture_output=True, text=True
    )
    if build.returncode != 0:
        pytest.fail(f"gcc {flag} cannot build (scripts/test installs gcc-multilib): "
                    f"{build.stderr.strip()}")
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    table: dict[int, str] = {}
    for line in out.stdout.splitlines():
        nr, name = line.split()
        table[int(nr)] = name
    return table


@pytest.mark.i386
def test_i386_matches_gcc_m32(tmp_path: Path) -> None:
    assert compiled_syscall_numbers(tmp_path, "-m32") == syscalls_i386.NAMES


def test_x86_64_matches_gcc(tmp_path: Path) -> None:
    assert compiled_syscall_numbers(tmp_path, "-m64") == syscalls_x86_64.NAMES


def test_aarch64_matches_clangs_arm64_headers() -> None:
    """arm64's table against glibc's arm64 <sys/syscall.h> (libc6-dev-arm64-cross: arm64's own
    asm/unistd.h) as clang's preprocessor for aarch64 reads it, not the generator's cpp run."""
    clang = shutil.which("clang")
    if clang is None:
        pytest.fail("clang is not installed: run scripts/setup --vm")
    listing = subprocess.run(
        [clang, "--target=aarch64-linux-gnu", "-dM", "-E", "-include", "sys/syscall.h", "-"],
        input="", capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.fail(f"clang cannot preprocess for aarch64 (run scripts/setup --vm): "
                    f"{listing.stderr.strip()}")
    macros = dict(re.findall(r"^#define (\w+) (\w+)$", listing.stdout, re.M))
    table: dict[int, str] = {}
    for name, value in macros.items():
        if name.startswith("SYS_"):
            while value in macros:
                value = macros[value]
            table[int(value)] = name[4:]
    assert len(table) > 290
    assert table == syscalls_aarch64.NAMES
    nr = syscalls_aarch64.NUMBERS
    assert (nr["read"], nr["clock_gettime"], nr["rt_sigreturn"], nr["gettid"]) == (63, 113, 139, 178)
    assert syscalls_aarch64.NARGS[nr["clock_gettime"]] == 2


# --- errno --------------------------------------------------------------------


def test_errno_matches_python_errno() -> None:
    ours = {e.name: e.value for e in Errno} | {
        a: e.value for a, e in errnos.ALIASES.items()
    }
    both = [name for name in ours if hasattr(errno, name)]
    assert len(both) > 120
    for name in both:
        assert ours[name] == getattr(errno, name), name


def test_errno_has_every_python_errno() -> None:
    # ENOTSUP is glibc's name for EOPNOTSUPP; the kernel has no such define.
    libc_only = {"ENOTSUP"}
    python_names = {n for n in dir(errno) if re.fullmatch(r"E[A-Z0-9_]+", n)}
    missing = python_names - libc_only - set(Errno.__members__) - set(errnos.ALIASES)
    assert not missing


def test_errno_first_name_wins() -> None:
    assert Errno(11).name == "EAGAIN"
    assert Errno(35).name == "EDEADLK"
    assert errnos.ALIASES == {"EWOULDBLOCK": Errno.EAGAIN, "EDEADLOCK": Errno.EDEADLK}
    assert "EWOULDBLOCK" not in Errno.__members__
    assert Errno.EPERM.value == 1
    assert max(e for e in Errno if e < 512) is Errno.EHWPOISON
    assert Errno.EHWPOISON.value == 133


def test_errno_restart_codes() -> None:
    # include/linux/errno.h
    assert Errno.ERESTARTSYS.value == 512
    assert Errno.ERESTARTNOINTR.value == 513
    assert Errno.ERESTARTNOHAND.value == 514
    assert Errno.ENOIOCTLCMD.value == 515
    assert Errno.ERESTART_RESTARTBLOCK.value == 516


# --- signals ------------------------------------------------------------------


def test_signal_matches_python_signal() -> None:
    ours = {s.name: s.value for s in Signal} | {
        a: s.value for a, s in signals.ALIASES.items()
    }
    both = [name for name in ours if hasattr(signal, name)]
    assert len(both) >= 31
    for name in both:
        assert ours[name] == getattr(signal, name), name


def test_signal_has_every_python_standard_signal() -> None:
    # glibc's SIGRTMIN is 34: it keeps 32 and 33 for itself (nptl); the kernel's is 32.
    python = {s.name for s in signal.Signals if s < signals.SIGRTMIN}
    assert python <= set(Signal.__members__) | set(signals.ALIASES)
    assert [s.value for s in Signal] == list(range(1, 32))
    assert signals.SIGRTMAX == int(signal.SIGRTMAX) == 64


@pytest.mark.parametrize(
    ("n", "name"),
    [
        (0, "0"),
        (1, "SIGHUP"),
        (6, "SIGABRT"),
        (29, "SIGIO"),
        (31, "SIGSYS"),
        (32, "SIGRTMIN"),
        (33, "SIGRT_1"),
        (34, "SIGRT_2"),
        (64, "SIGRT_32"),
        (65, "65"),
        (-1, "-1"),
    ],
)
def test_signame(n: int, name: str) -> None:
    assert signame(n) == name


@pytest.mark.live
def test_signame_matches_strace(tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    numbers = list(range(0, 66))
    log = tmp_path / "strace.log"
    target = (
        "import os\n"
        f"for s in {numbers!r}:\n"
        "    try:\n"
        f"        os.kill({NO_SUCH_PID}, s)\n"
        "    except OSError:\n"
        "        pass\n"
    )
    run = subprocess.run(
        [strace, "-qq", "-e", "trace=kill", "-e", "signal=none", "-o", str(log)]
        + [sys.executable, "-c", target],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0 or not log.exists():
        pytest.skip(f"strace cannot trace here: {run.stderr.strip()}")
    pattern = rf"^kill\({NO_SUCH_PID}, (\w+)\)"
    printed = re.findall(pattern, log.read_text(), re.M)
    assert printed == [signame(n) for n in numbers]


# --- the generator ------------------------------------------------------------


def test_generator_reproduces_checked_in_tables(tmp_path: Path) -> None:
    missing = [str(h) for h in HEADERS if not h.exists()]
    if missing or shutil.which("dpkg-query") is None:
        pytest.skip(f"linux-libc-dev headers or dpkg-query missing: {missing}")
    subprocess.run(
        [sys.executable, str(GENERATOR), "--output-dir", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    generated = sorted(p.name for p in tmp_path.glob("*.py"))
    # hwcap_aarch64.py is written from a newer kernel's arch/arm64 header than the host's
    # linux-libc-dev has (its docstring names it), not generated
    checked_in = sorted(p.name for p in TABLES.glob("*.py") if p.name != "hwcap_aarch64.py")
    assert generated == checked_in
    for name in generated:
        fresh = (tmp_path / name).read_bytes()
        assert (
            fresh == (TABLES / name).read_bytes()
        ), f"tracer/tables/{name} is stale: run scripts/gen-tables"
