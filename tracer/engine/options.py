"""What a trace is asked to do and what it reports: options, -e's function selection, the
statistics records, facts of the clock source and time namespace."""
from __future__ import annotations

from dataclasses import dataclass

from tracer.errors import UnknownFunction, UsageError
from tracer.vdso import SIGRETURN_TRAMPOLINES, VdsoFunction, VdsoImage


# Clock sources with a vDSO read mode (arch/x86: vclock_mode VDSO_CLOCKMODE_TSC, PVCLOCK,
# HVCLOCK); others (hpet, acpi_pm, jiffies) make every clock_gettime a system call.
_FAST_CLOCKSOURCES = frozenset({"tsc", "kvm-clock", "hyperv_clocksource_tsc_page",
                                "arch_sys_counter", "riscv_clocksource", "timer"})


def clocksource_info() -> tuple[str | None, bool | None]:
    try:
        with open("/sys/devices/system/clocksource/clocksource0/current_clocksource") as f:
            name = f.read().strip()
    except OSError:
        return None, None
    return name, name in _FAST_CLOCKSOURCES


def timens_offsets(pid: int) -> dict[str, tuple[int, int]] | None:
    """/proc/PID/timens_offsets: null unless the tracee lives in a time namespace with offsets."""
    try:
        with open(f"/proc/{pid}/timens_offsets") as f:
            text = f.read()
    except OSError:
        return None
    out: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out[parts[0]] = (int(parts[1]), int(parts[2]))
    if not out or all(v == (0, 0) for v in out.values()):
        return None
    return out


@dataclass
class TraceOptions:
    funcs: list[str] | None = None       # -e specs; None: the default set
    follow_forks: bool = False
    signals: bool = False
    stack_depth: int | None = None
    inject: bool = False
    lossy: bool = False                  # --inject: a full ring drops calls instead of waiting
    pin: bool = True
    duration: float | None = None
    demangle: bool = True                # C++/Rust symbol names as their source spells them
    string_size: int = 32                # -s: bytes of a buffer shown (strace's default)


@dataclass(frozen=True, slots=True)
class FuncStats:
    func: str
    calls: int
    fallbacks: int
    errors: int
    total_ns: int


@dataclass(frozen=True, slots=True)
class Summary:
    rows: list[FuncStats]
    reasons: dict[str, dict[str, int]]                            # func -> reason -> calls
    sites: dict[str, list[tuple[str, int, int]]]                  # func -> (site, calls, ns)
    paths: dict[str, list[tuple[tuple[str, ...], int, int]]]      # func -> (frames, calls, ns)
    unused: list[str]
    diagnosis: str | None
    lost: int = 0                      # --inject: calls not recorded (ring full) or corrupt


@dataclass(frozen=True, slots=True)
class SessionInfo:
    pid: int | None
    abi: str | None
    vdso_base: int | None
    image: VdsoImage | None
    threads: list[int]
    functions: list[str]
    calls: int
    fallbacks: int
    state: str


def resolve_functions(image: VdsoImage, specs: list[str] | None) -> list[VdsoFunction]:
    """-e semantics: plain names or symbols, `!name` excludes; default: every export but the
    sigreturn trampolines. Unknown names are refused, listing the ones that exist."""
    default = [f for f in image.functions if f.symbol not in SIGRETURN_TRAMPOLINES]
    if specs is None:
        return default
    if not specs:
        return []                      # the console's "no breakpoints yet"
    names = [n.strip() for spec in specs for n in spec.split(",") if n.strip()]
    include: list[VdsoFunction] = []
    exclude: set[str] = set()
    for n in names:
        neg = n.startswith("!")
        key = n[1:] if neg else n
        if key in ("all", "*"):
            if not neg:
                include.extend(default)
            continue
        f = image.function(key)
        if f is None:
            known = ", ".join(f.plain for f in image.functions)
            raise UnknownFunction(f"no vDSO function {key!r} in this {image.abi.name} vDSO; "
                                  f"it exports: {known}")
        if neg:
            exclude.add(f.symbol)
        else:
            include.append(f)
    if not include and exclude:
        include = default              # only exclusions: everything else
    seen: set[str] = set()
    out = []
    for f in include:
        if f.symbol not in exclude and f.symbol not in seen:
            seen.add(f.symbol)
            out.append(f)
    if not out:
        raise UsageError(f"-e {','.join(names)} selects no function of this vDSO")
    return out
