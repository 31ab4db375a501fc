"""The recording format on hand-made events (pure: no process): every event type round-trips
exactly (the renderers print the same lines from the read events as from the written ones),
a checked-in version-1 file still reads the same, and damaged files (cut at every byte, wrong
magic, a future version, garbage in the middle) give what came before the damage and one
clear line, never a traceback."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tracer.events import (Addr, AttachEvent, CallEvent, DetachEvent, ExecEvent, ExitEvent,
                           NoticeEvent, SignalEvent, SigreturnEvent, SyscallEvent, Timespec,
                           Timeval, Timezone, Unreadable)
from tracer.recording.format import VERSION, Name, Process, RecordingError, Trailer
from tracer.recording.reader import Reader
from tracer.recording.writer import Writer
from tracer.render import jsonl, text

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "recording-v1.bin"
HEADER = {"format": "vdsotrace recording", "tool": "vdsotrace test", "host_arch": "x86_64",
          "start_time": 1796000000.25, "command": ["prog", "x"], "pids": None,
          "clocksource": "tsc", "vdso_fast_path": True, "options": {"inject": False}}
T0 = 1796000000.5


def _events() -> list[Any]:
    args = {"clockid": "CLOCK_MONOTONIC", "tp": Addr(0x7FFC0000)}
    evs: list[Any] = [
        AttachEvent(100, 100, T0, 0x7F0000000000, "x86_64", "tsc", True,
                    {"monotonic": (5, 6), "boottime": (-1, 0)}, 2,
                    ("clock_gettime", "gettimeofday", "time"), None, True, 12.5),
        NoticeEvent(100, 100, T0, "a notice with \x1b escape and \udcff byte"),
    ]
    for i in range(40):
        evs.append(CallEvent(100, 101 + i % 2, T0 + i * 1e-6, "clock_gettime",
                             "__vdso_clock_gettime", args, 0, None,
                             {"tp": Timespec(10 + i, 999_999_999 - i)}, False, None, 40 + i,
                             0x401234, "0x401234 prog+0x1234", "prog!main+0x24",
                             ("0x401234 prog!main+0x24", "0x402000 libc.so.6!start+0x8")
                             if i % 3 == 0 else None, False, "prog!main+0x24"))
    evs += [
        CallEvent(100, 101, T0 + 1, "clock_gettime", "__vdso_clock_gettime",
                  {"clockid": 12345, "tp": Addr(0x10)}, -22, "EINVAL",
                  {"tp": Unreadable(0x10)}, True, "invalid-clock", 900, 0, "0x0", None, None,
                  True, None),
        CallEvent(100, 101, T0 + 2, "gettimeofday", "__vdso_gettimeofday",
                  {"tv": Addr(1), "tz": Addr(2)}, 0, None,
                  {"tv": Timeval(1, 2), "tz": Timezone(-60, 0)}, False, None, 5, 1 << 63,
                  "0x8000000000000000", None, None),
        CallEvent(100, 101, T0 + 3, "time", "__vdso_time", {"tloc": None}, 1796000003, None,
                  {"tloc": 1 << 70}, False, None, 3, 5, "0x5", None, None),
        SyscallEvent(100, 101, T0 + 4, 4, "write", (1, 0x800000, 5), 5, None, 1000,
                     "clock_gettime", {1: b"hi\xff\x00"}, (1,)),
        SyscallEvent(100, 101, T0 + 5, 1, "exit", (0,), None, None, 0, None),
        SignalEvent(100, 101, T0 + 6, 10, "SIGUSR1", 0x401000, "prog!h", 0x402000, None,
                    0x401500, 0x7FFC1000),
        SigreturnEvent(100, 101, T0 + 7, "__restore_rt", 0x401500, None, 10, None, False),
        ExecEvent(100, 100, T0 + 8, "/bin/\udcfe", 0x7F0000001000, "i386", None, None),
        ExitEvent(100, 101, T0 + 9, None, "SIGKILL"),
        ExitEvent(100, 100, T0 + 9.5, 3, None),
        DetachEvent(100, 100, T0 + 10, 0x7F0000001000, "i386", "exit"),
    ]
    return evs


def _write(events: list[Any], end: bool = True) -> bytes:
    f = io.BytesIO()
    w = Writer(f, HEADER)
    w.process(100, "x86_64", 0x7F0000000000, b"\x7fELF fake image")
    w.name(100, 101, "worker")
    for e in events:
        if type(e) is CallEvent:
            w.call(e)
        else:
            w.event(e)
    w.name(100, 101, "renamed")
    if end:
        w.end({"end_time": T0 + 11, "reason": "exit", "lost": 0,
               "functions": ["clock_gettime", "gettimeofday", "time"]})
    w.flush()
    return f.getvalue()


def _read(data: bytes) -> tuple[Reader, list[Any]]:
    r = Reader(io.BytesIO(data), "test.rec")
    return r, list(r.items())


def _only_events(items: list[Any]) -> list[Any]:
    return [i for i in items if not isinstance(i, (Process, Trailer, Name))]


def test_round_trip_every_event_type() -> None:
    evs = _events()
    r, items = _read(_write(evs))
    assert r.damage is None and r.trailer is not None
    assert r.header == HEADER
    got = _only_events(items)
    assert got == evs
    for a, b in zip(got, evs):
        assert type(a) is type(b)
        assert jsonl.format_event(a) == jsonl.format_event(b)
        assert text.format_event(a, True) == text.format_event(b, True)
    assert items[0] == Process(100, "x86_64", 0x7F0000000000, b"\x7fELF fake image")
    assert items[1] == Name(100, 101, "worker")
    assert Name(100, 101, "renamed") in items
    assert r.trailer.values["functions"] == ["clock_gettime", "gettimeofday", "time"]


def test_an_image_is_written_once() -> None:
    f = io.BytesIO()
    w = Writer(f, HEADER)
    for pid in range(100, 110):
        w.process(pid, "x86_64", 0x7F0000000000, b"I" * 8192)
    w.end({})
    assert len(f.getvalue()) < 8192 + 1000
    r, items = _read(f.getvalue())
    assert [i for i in items if isinstance(i, Process)] == [
        Process(pid, "x86_64", 0x7F0000000000, b"I" * 8192) for pid in range(100, 110)]


def test_strings_are_interned() -> None:
    """A repeated call costs its fixed record and its out value only."""
    one = _write(_events()[:3])
    many = _write(_events()[:42])
    per_call = (len(many) - len(one)) / 39
    assert per_call < 100, per_call


def test_checked_in_version_1_file_reads_the_same() -> None:
    """The format of version 1 does not change: a file written by the first writer reads as
    these events. Version 2 only added records (ring slots): today's writer writes those
    very bytes for these events, with its own version number."""
    assert VERSION == 2
    data = FIXTURE.read_bytes()
    assert data[8:10] == (1).to_bytes(2, "little")
    r, items = _read(data)
    assert r.damage is None and r.version == 1
    assert _only_events(items) == _events()
    assert _write(_events()) == data[:8] + VERSION.to_bytes(2, "little") + data[10:]


def test_cut_at_every_byte() -> None:
    data = _write(_events())
    full = _only_events(_read(data)[1])
    header_end = 16 + int.from_bytes(data[12:16], "little") + 4
    for cut in range(0, len(data)):
        try:
            r, items = _read(data[:cut])
        except RecordingError as e:
            assert cut < header_end, (cut, e)       # only a cut header is refused whole
            assert "\n" not in str(e)
            continue
        got = _only_events(items)
        assert got == full[:len(got)], cut
        assert r.damage is not None, cut
        assert "\n" not in r.damage.message


def test_wrong_magic_and_future_version() -> None:
    data = _write(_events())
    with pytest.raises(RecordingError, match="not a vdsotrace recording"):
        _read(b"ELF" + data[3:])
    future = data[:8] + (VERSION + 1).to_bytes(2, "little") + data[10:]
    with pytest.raises(RecordingError, match="version 3.*newer vdsotrace"):
        _read(future)
    with pytest.raises(RecordingError, match="not a vdsotrace recording"):
        _read(b"")


def test_garbage_in_the_middle() -> None:
    """Damage inside a chunk fails its checksum: the chunks before it are read, then one
    line says where."""
    f = io.BytesIO()
    w = Writer(f, HEADER)
    evs = _events()
    for i, e in enumerate(evs):
        w.call(e) if type(e) is CallEvent else w.event(e)
        if i % 10 == 9:
            w.flush()             # several chunks
    w.end({"end_time": T0})
    data = bytearray(f.getvalue())
    full = _only_events(_read(bytes(data))[1])
    mid = len(data) // 2
    data[mid:mid + 8] = b"\xa5" * 8
    r, items = _read(bytes(data))
    got = _only_events(items)
    assert 0 < len(got) < len(full)
    assert got == full[:len(got)]
    assert r.damage is not None and "corrupt" in r.damage.message
    assert r.damage.offset <= mid


def test_no_trailer_is_reported() -> None:
    r, items = _read(_write(_events(), end=False))
    assert _only_events(items) == _events()
    assert r.damage is not None and "no end record" in r.damage.message


def _report(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracer", "report", str(path), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_report_of_damaged_files(tmp_path: Path) -> None:
    """The command: the events before the damage on stdout, one line on stderr, exit 1."""
    data = _write(_events())
    whole = tmp_path / "whole.rec"
    whole.write_bytes(data)
    ok = _report(whole, "--json")
    assert ok.returncode == 0 and not ok.stderr, ok.stderr
    lines = ok.stdout.splitlines()
    assert len(lines) == len(_events())
    for cut, what in ((len(data) - 300, "truncated"), (len(data) - 1, "")):
        p = tmp_path / f"cut{cut}.rec"
        p.write_bytes(data[:cut])
        r = _report(p, "--json")
        assert r.returncode == 1
        assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        assert what in r.stderr
        got = r.stdout.splitlines()
        assert got == lines[:len(got)]
    for name, blob in (("magic", b"GARBAGE!" + data[8:]),
                       ("future", data[:8] + b"\x09\x00" + data[10:]),
                       ("empty", b""), ("text", b"hello\n")):
        p = tmp_path / f"{name}.rec"
        p.write_bytes(blob)
        r = _report(p)
        assert r.returncode == 1 and r.stdout == ""
        assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    r = _report(tmp_path / "missing.rec")
    assert r.returncode == 1 and "no such file" in r.stderr


def test_report_filters_and_refuses(tmp_path: Path) -> None:
    p = tmp_path / "r.rec"
    p.write_bytes(_write(_events()))
    r = _report(p, "-e", "time", "--json")
    assert r.returncode == 0, r.stderr
    import json
    evs = [json.loads(x) for x in r.stdout.splitlines()]
    assert {e["func"] for e in evs if e["event"] == "call"} == {"time"}
    assert not [e for e in evs if e["event"] == "syscall"]
    assert [e["functions"] for e in evs if e["event"] == "attach"] == [["time"]]
    r = _report(p, "-e", "getcpu")
    assert r.returncode == 1 and "not recorded" in r.stderr and len(r.stderr.splitlines()) == 1


if __name__ == "__main__":        # regenerate the fixture (only with a VERSION change)
    FIXTURE.write_bytes(_write(_events()))


def test_report_of_a_forged_file(tmp_path: Path) -> None:
    """Valid checksums around fields of the wrong type: one line, not a traceback."""
    evs = _events()
    forged = AttachEvent(100, 100, T0, 0x1000, "x86_64", "tsc", True, None, 1,
                         123, None, True)  # type: ignore[arg-type]
    p = tmp_path / "forged.rec"
    p.write_bytes(_write(evs[1:5] + [forged] + evs[5:]))
    r = _report(p)
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1 and "cannot be rendered" in r.stderr, r.stderr
    assert len(r.stdout.splitlines()) == 4


def _slots_file(end: bool = True) -> tuple[bytes, list[Any]]:
    """A version-2 file: events, then runs of the checked-in ring slots (their valid ones)
    with their context and callers, then more events."""
    from tracer.inject import layout as L
    from tracer.recording.format import SlotContext
    slots = (REPO / "tests" / "fixtures" / "ring-slots.bin").read_bytes()
    good = b"".join(slots[j * L.SLOT:(j + 1) * L.SLOT] for j in range(250))
    ctx = SlotContext(100, "x86_64", (("gettimeofday", "__vdso_gettimeofday"),
                                      ("time", "__vdso_time"),
                                      ("clock_gettime", "__vdso_clock_gettime"),
                                      ("clock_getres", "__vdso_clock_getres"),
                                      ("getcpu", "__vdso_getcpu"),
                                      ("getrandom", "__vdso_getrandom")), T0 - 100.0, True,
                      False)
    f = io.BytesIO()
    w = Writer(f, HEADER)
    evs = _events()
    for e in evs[:5]:
        w.event(e) if type(e) is not CallEvent else w.call(e)
    w.slot_callers(100, {0x401234: ("0x401234 prog+0x1234", "prog!main+0x24")})
    w.slots(ctx, good[:100 * L.SLOT], 0.5, 1000, 5000)
    w.slots(ctx, good[100 * L.SLOT:], 0.25, 2000, 6000)
    for e in evs[5:]:
        w.event(e) if type(e) is not CallEvent else w.call(e)
    if end:
        w.end({"end_time": T0 + 11, "reason": "exit", "lost": 0, "functions": []})
    return f.getvalue(), evs


def test_slots_round_trip_and_cut_at_every_byte() -> None:
    from tracer.recording.format import SlotCaller, Slots
    data, evs = _slots_file()
    r, items = _read(data)
    assert r.damage is None and r.version == VERSION
    runs = [i for i in items if isinstance(i, Slots)]
    assert [len(s.data) // 128 for s in runs] == [100, 150]
    assert (runs[0].rate, runs[0].tsc0, runs[0].ns0, runs[1].rate) == (0.5, 1000, 5000, 0.25)
    assert runs[0].ctx.funcs[2] == ("clock_gettime", "__vdso_clock_gettime")
    assert [i for i in items if isinstance(i, SlotCaller)] == [
        SlotCaller(100, 0x401234, "0x401234 prog+0x1234", "prog!main+0x24")]
    full = [i for i in items if not isinstance(i, (Process, Trailer, Name))]
    header_end = 16 + int.from_bytes(data[12:16], "little") + 4
    for cut in range(header_end, len(data), 7):
        r, got = _read(data[:cut])
        got = [i for i in got if not isinstance(i, (Process, Trailer, Name))]
        assert got == full[:len(got)], cut
        assert r.damage is not None and "\n" not in r.damage.message


def test_slots_are_not_read_from_a_version_1_file() -> None:
    """Version 1 had no slot records: their tags there are damage, not data."""
    data, _ = _slots_file()
    v1 = data[:8] + (1).to_bytes(2, "little") + data[10:]
    r, _ = _read(v1)
    assert r.damage is not None and "unknown record type" in r.damage.message


def test_report_of_slots(tmp_path: Path) -> None:
    """report turns recorded slots into call lines (one per slot, in order, named with the
    recorded caller); slots no stub writes (a forged file) give one line and exit 1; a cut
    inside a run of slots shows the events before it."""
    import json
    data, evs = _slots_file()
    p = tmp_path / "slots.rec"
    p.write_bytes(data)
    r = _report(p, "--json")
    assert r.returncode == 0 and not r.stderr, r.stderr
    got = [json.loads(x) for x in r.stdout.splitlines()]
    calls = [e for e in got if e["event"] == "call"]
    n_ev_calls = sum(type(e) is CallEvent for e in evs)
    assert len(calls) == 250 + n_ev_calls
    slot_calls = [e for e in got[5:5 + 250]]
    assert all(e["event"] == "call" and e["pid"] == 100 for e in slot_calls)
    assert {e["tid"] for e in slot_calls} == {4242, 4243, 99999}
    named = [e for e in slot_calls if e["caller_addr"] == "0x401234"]
    assert all(e["caller"] == "0x401234 prog+0x1234" for e in named)
    cut = tmp_path / "cut.rec"
    cut.write_bytes(data[:len(data) - 2000])
    r = _report(cut, "--json")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    part = [json.loads(x) for x in r.stdout.splitlines()]
    assert 5 <= len(part) < len(got) and part == got[:len(part)]
    from tracer.inject import layout as L
    from tracer.recording.format import SlotContext
    f = io.BytesIO()
    w = Writer(f, HEADER)
    bad = bytearray((REPO / "tests" / "fixtures" / "ring-slots.bin").read_bytes()[:4 * L.SLOT])
    bad[2 * L.SLOT + L.S_FID] = 99            # no such function
    w.slots(SlotContext(100, "x86_64", (("time", "__vdso_time"),), 0.0, True, False),
            bytes(bad), 1.0, 0, 0)
    w.end({"end_time": T0, "reason": "exit", "lost": 0, "functions": []})
    forged = tmp_path / "forged.rec"
    forged.write_bytes(f.getvalue())
    r = _report(forged, "--json")
    assert r.returncode == 1 and "cannot be rendered" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
