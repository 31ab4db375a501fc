"""Real runtimes nobody here wrote (CPython, Node.js, Perl, a JVM), each making 20,000 time
calls under `trace -p`: every call seen, the program finishes normally, the tracer exits 0
when it ends. The same with `--inject` where the runtime is 64-bit."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import targets as T

pytestmark = pytest.mark.live

N = 20000
TIME_FUNCS = {"clock_gettime", "gettimeofday", "time"}

PY = f"""
import sys, time
print("ready", flush=True)
sys.stdin.readline()
for _ in range({N}):
    time.time()
print("done", flush=True)
"""
NODE = f"""
process.stdout.write("ready\\n");
process.stdin.once("data", () => {{
  for (let i = 0; i < {N}; i++) process.hrtime.bigint();
  console.log("done");
  process.exit(0);
}});
"""
PERL = f"""
use Time::HiRes qw(time);
$| = 1;
print "ready\\n";
my $go = <STDIN>;
my $t;
$t = time() for 1..{N};
print "done\\n";
"""
JAVA = f"""
public class Clock {{
  public static void main(String[] a) throws Exception {{
    System.out.println("ready");
    System.out.flush();
    System.in.read();
    long s = 0;
    for (int i = 0; i < {N}; i++) s += System.nanoTime();
    System.out.println("done " + (s != 0));
  }}
}}
"""


def _runtime(name: str, tmp: Path) -> list[str]:
    if name == "python":
        return [sys.executable, "-c", PY]
    if name == "node":
        return [_need("node"), "-e", NODE]
    if name == "perl":
        return [_need("perl"), "-e", PERL]
    src = tmp / "Clock.java"
    src.write_text(JAVA)
    return [_need("java"), "-Xshare:auto", "-XX:TieredStopAtLevel=1", str(src)]


def _need(prog: str) -> str:
    path = shutil.which(prog)
    if path is None:
        pytest.skip(f"{prog} is not installed")
    return path


def _trace_runtime(name: str, tmp: Path, extra: list[str]) -> list[dict]:
    p = subprocess.Popen(_runtime(name, tmp), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdin is not None
        line = p.stdout.readline()
        assert line.strip() == b"ready", (line, p.stderr.read() if p.poll() else b"")
        tr = T.run_trace(["-p", str(p.pid), *extra], tmp / "ev.jsonl", attach_timeout=60)
        p.stdin.write(b"go\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, (p.returncode, err.decode(errors="replace")[-2000:])
        assert out.decode().startswith("done"), out
        tr.wait_ok(30)
        return tr.events()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("name", ["python", "node", "perl", "java"])
def test_runtime_traced(tmp_path, name):
    events = _trace_runtime(name, tmp_path, [])
    calls = [e for e in events if e["event"] == "call" and e["func"] in TIME_FUNCS]
    assert len(calls) >= N, f"{len(calls)} time calls seen, the program made {N}"
    assert any(e["event"] == "exit" for e in events)
    assert all(e["ret"] >= 0 for e in calls if e["func"] != "time")


@pytest.mark.parametrize("name", ["python", "node", "java"])
def test_runtime_inject(tmp_path, name):
    events = _trace_runtime(name, tmp_path, ["--inject"])
    calls = [e for e in events if e["event"] == "call" and e["func"] in TIME_FUNCS]
    lost = [e for e in events if e["event"] == "notice" and "not recorded" in e["message"]]
    assert not lost, lost
    assert len(calls) >= N, f"{len(calls)} time calls recorded, the program made {N}"
