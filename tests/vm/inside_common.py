"""What the inside_*.py scripts (run inside the arm64 machine) share: letting the target
program finish and reporting how it ended."""
from __future__ import annotations

import subprocess
from typing import Any


def finish(p: subprocess.Popen[bytes], timeout: float, go: bytes = b"") -> dict[str, Any]:
    """Write `go` to the target's stdin (its go byte; nothing when empty), close it and wait
    `timeout` seconds for the target to exit (then kill it): {"rc", "stderr"}."""
    if go:
        assert p.stdin is not None
        p.stdin.write(go)
        p.stdin.flush()
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    return {"rc": p.returncode, "stderr": err.decode(errors="replace")}
