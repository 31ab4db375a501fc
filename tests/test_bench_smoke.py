"""scripts/bench runs and prints a table with numbers in it. No timing is asserted."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench"
ANCHORS = REPO.parent / "shared" / "anchors"

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(shutil.which("gcc") is None, reason="the bench compiles its workload with gcc"),
]

NUMBER = r"[0-9]+\.[0-9]+"


def table_row(output: str, name: str) -> str:
    rows = [ln for ln in output.splitlines() if ln.split()[:1] == [name]]
    assert rows, f"no {name} row in:\n{output}"
    return rows[0]


def test_quick_bench_prints_numbers(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "untraced,ctracer-emul",
         "--json", str(out_json)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert re.search(r"^machine: nproc=\d+ .*clocksource=", r.stdout, re.M), r.stdout

    assert re.fullmatch(rf"untraced\s+\d+\s+{NUMBER}\b.*", table_row(r.stdout, "untraced"))
    emul = table_row(r.stdout, "ctracer-emul")
    if (ANCHORS / "ctracer.c").is_file():
        # its own row: a number, and a ratio of 1.00 to itself
        assert re.fullmatch(rf"ctracer-emul\s+\d+\s+{NUMBER}\s+-\s+1\.00\s+-", emul), emul
    else:
        assert "n/a (" in emul

    data = json.loads(out_json.read_text())
    untraced = data["configs"]["untraced"]
    assert len(untraced["us_per_call"]) == data["rounds"] == 2
    assert all(isinstance(v, float) and v > 0 for v in untraced["us_per_call"])
    assert set(data["configs"]) == {"untraced", "ctracer-emul"}


def test_unknown_configuration_is_a_usage_error() -> None:
    r = subprocess.run([sys.executable, str(BENCH), "--only", "no-such-tracer"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2
    assert "unknown configuration no-such-tracer" in r.stderr


@pytest.mark.parametrize("mode", ["c", "json"])
def test_tracer_cpu_prints_a_figure_and_sees_every_call(mode: str) -> None:
    """scripts/tracer_cpu: every run's calls are all seen (events or -c counts, plus any the
    tracer reported not recording), and a per-record figure is printed."""
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "tracer_cpu"), "--mode", mode,
                        "--calls", "500,1500", "--rounds", "1"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr
    runs = re.findall(r"^--inject \w+ N=\d+: tracer cpu .*$", r.stdout, re.M)
    assert len(runs) == 2 and not any("!=" in run for run in runs), r.stdout
    assert re.search(rf"^--inject {mode}: tracer CPU per record -?\d+ ns", r.stdout, re.M), \
        r.stdout
