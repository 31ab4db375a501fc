"""Run inside the arm64 machine (scripts/vm aarch64) by tests/vm/test_inspect_aarch64.py:

    python3 inside_inspect.py TARGET OUTDIR

Starts TARGET (tests/targets/a64smoke.c built for aarch64); while it waits for its go byte,
runs `vdsotrace auxv|vdso|dump|disas -p PID` on it (and `trace`/`record --inject`, which
install the in-tracee recorder and leave) and saves the oracles beside their output
in OUTDIR: /proc/PID/auxv, the [vdso] mapping read from /proc/PID/mem, /proc/PID/maps and
/proc/cpuinfo (the kernel's own names of the AT_HWCAP/AT_HWCAP2 bits). Then lets the target
run its calls and collects its record. Prints one JSON object of what it saw; asserts nothing
(the host-side test judges).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from inside_common import finish


def run(argv: list[str]) -> dict[str, Any]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return {"argv": argv, "rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr}


def run_here(argv: list[str]) -> dict[str, Any]:
    """`vdsotrace ARGS` as run() gives it, but in this process (tracer.cli.main with its output
    captured): the inspection commands attach, read and detach, and each of them started as a
    process of its own spent ~6 s importing the tracer in the emulated machine."""
    import contextlib
    import io

    from tracer.cli import main as cli_main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli_main(argv[1:])
        except SystemExit as e:     # argparse's usage errors
            rc = e.code if isinstance(e.code, int) else 1
    return {"argv": argv, "rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> int:
    target, outdir = sys.argv[1], Path(sys.argv[2])
    record = outdir / "record.jsonl"
    p = subprocess.Popen([target, str(record)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stdin is not None
    ready = p.stdout.readline().decode().strip()
    pid = p.pid
    out: dict[str, Any] = {"pid": pid, "ready": ready}
    maps = Path(f"/proc/{pid}/maps").read_text()
    (outdir / "maps.txt").write_text(maps)
    lo, hi = next((int(a, 16), int(b, 16)) for a, b in
                  (line.split()[0].split("-") for line in maps.splitlines()
                   if line.endswith("[vdso]")))
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(lo)
        (outdir / "vdso-mem.so").write_bytes(mem.read(hi - lo))
    (outdir / "auxv.bin").write_bytes(Path(f"/proc/{pid}/auxv").read_bytes())
    (outdir / "cpuinfo.txt").write_text(Path("/proc/cpuinfo").read_text())
    vt = "vdsotrace"
    out["vdsotrace"] = {
        "auxv_json": run_here([vt, "auxv", "--json", "-p", str(pid)]),
        "auxv_text": run([vt, "auxv", "-p", str(pid)]),     # (one as a process, as a user runs it)
        "vdso_json": run_here([vt, "vdso", "--json", "-p", str(pid)]),
        "vdso_text": run_here([vt, "vdso", "-p", str(pid)]),
        "dump": run_here([vt, "dump", "-p", str(pid), "-o", str(outdir / "vdso-dump.so")]),
        "disas": {name: run_here([vt, "disas", "-p", str(pid), name])
                  for name in ("clock_gettime", "__kernel_gettimeofday", "clock_getres",
                               "__kernel_rt_sigreturn", "getrandom")},
        "disas_att": run_here([vt, "disas", "-p", str(pid), "clock_gettime", "--syntax", "att"]),
        "disas_unknown": run([vt, "disas", "-p", str(pid), "time"]),   # (its one line, as run)
        # --inject on the idle process (installed, nothing to record, left after 2 s) and on
        # a command: each must leave the process as it was (checked below)
        "trace": run([vt, "trace", "--inject", "-p", str(pid), "--duration", "2"]),
        "trace_out": run([vt, "trace", "--inject", "-p", str(pid), "--duration", "2", "-o",
                          str(outdir / "trace-out.txt")]),
        "record": run([vt, "record", "--inject", "-p", str(pid), "--duration", "2", "-o",
                       str(outdir / "trace.rec")]),
        "trace_cmd": run([vt, "trace", "--inject", "--", "sh", "-c",
                          f"echo ran > {outdir / 'spawned'}"]),
    }
    out["left_behind"] = sorted(n for n in ("trace-out.txt", "trace.rec", "spawned")
                                if (outdir / n).exists())
    # The same checks again after all of that: nothing of ours is left in the process.
    out["status_after"] = {line.split(":")[0]: line.split(":", 1)[1].strip()
                           for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith(("State", "TracerPid"))}
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(lo)
        out["vdso_unchanged"] = mem.read(hi - lo) == (outdir / "vdso-mem.so").read_bytes()
    out["target"] = finish(p, 60, go=b"g")
    out["record"] = ([json.loads(x) for x in record.read_text().splitlines()]
                     if record.exists() else [])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
