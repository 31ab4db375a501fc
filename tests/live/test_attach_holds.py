"""Nothing slow runs while the tracer holds the tracee (issue 11.5): between the seize and the
moment every thread runs again, the engine parses no ELF object (the program, its libraries:
node's 100 MB binary takes over a second), and parses and disassembles no vDSO (tens of ms);
and while it traces, naming the first calls parses nothing in the engine's thread either
(with the stop-based engine every thread that makes a call would wait for it). All of that is
done before the seize. Counted, not timed: the parsers are watched in the tracer's own
process while a real target is attached and traced (ptrace is not mocked)."""
from __future__ import annotations

import threading
import time

import pytest

import targets as T
from tracer import disasm, objfile, target, vdso
from tracer.events import AttachEvent, Event
from tracer.engine.control import Control
from tracer.session import Session, TraceOptions

pytestmark = pytest.mark.live


@pytest.mark.parametrize(("inject", "stack"), [
    pytest.param(False, None, id="stops-plain"), pytest.param(False, 16, id="stops-stack"),
    pytest.param(True, None, id="inject-plain")])      # (--inject --stack is refused)
def test_no_parse_while_the_tracee_is_held(target_bin, tmp_path, monkeypatch, inject, stack):
    proc = T.start(target_bin("spin"), tmp_path / "spin.jsonl", "--threads", "2")
    T.go(proc, close=False)
    # a cold start: nothing parsed yet in this process
    objfile.clear_object_cache()
    vdso._PARSED.clear()
    disasm._SITES.clear()
    disasm._TARGETS.clear()
    disasm._INSNS.clear()

    held = threading.Event()
    tracing = threading.Event()
    while_held: list[str] = []
    in_engine: list[str] = []

    def watch(owner: object, name: str) -> None:
        real = getattr(owner, name)

        def watched(*a: object, **k: object) -> object:
            # the background loader (symload.py) may parse: only the engine must not
            if not threading.current_thread().name.startswith("vdsotrace-symbols"):
                if held.is_set():
                    while_held.append(name)
                elif tracing.is_set() and name == "__init__":
                    in_engine.append(f"{a[-1]}")
            return real(*a, **k)
        monkeypatch.setattr(owner, name, watched)

    watch(objfile.ObjectFile, "__init__")
    watch(vdso, "_parse_image")
    watch(disasm, "_disassemble")
    watch(disasm, "_sites")
    watch(disasm, "_branch_targets")
    real_attach = target.attach_process

    def attach_process(*a: object, **k: object) -> object:
        held.set()                      # from here on the threads are being stopped
        return real_attach(*a, **k)     # type: ignore[arg-type]
    monkeypatch.setattr(target, "attach_process", attach_process)

    def sink(e: Event) -> None:
        if isinstance(e, AttachEvent):  # written once every thread runs again
            held.clear()
            tracing.set()

    s = Session(TraceOptions(inject=inject, stack_depth=stack), sink)
    control = Control(s)
    engine = control.start(pid=proc.pid)
    try:
        assert tracing.wait(10), "no attach event"
        time.sleep(0.5)                 # calls in both threads: the first ones need names
    finally:
        control.stop()
        engine.join(20)
        tracing.clear()
    assert not engine.is_alive()
    assert while_held == [], f"parsed while the tracee was held: {while_held}"
    assert in_engine == [], f"parsed in the engine while tracing: {in_engine}"
    assert s.calls > 0
    assert proc.popen.poll() is None
    assert proc.popen.stdin is not None
    proc.popen.stdin.close()
    rc, out, err = proc.finish(15)
    assert rc == 0 and "bad=0" in out, (rc, out, err)
