"""Renderers on hand-made events: the hand-built JSON line equals json.dumps of the event's
dict; strace-style strings; the text shapes the interface shows."""
from __future__ import annotations

import json

from tracer.events import (Addr, CallEvent, SyscallEvent, Timespec, Timeval, Timezone,
                           Unreadable)
from tracer.decoders.syscalls import clip_strings
from tracer.render import jsonl, text


def _call(**kw: object) -> CallEvent:
    base = dict(pid=4711, tid=4712, time=1700000000.25, func="clock_gettime",
                symbol="__vdso_clock_gettime",
                args={"clockid": "CLOCK_MONOTONIC", "tp": Addr(0x7FFC0000)}, ret=0, errno=None,
                out={"tp": Timespec(239, 381677643)}, fallback=False, fallback_reason=None,
                duration_ns=4, caller=0x7F0000001234,
                caller_text="0x7f0000001234 libc.so.6+0x1234",
                caller_symbol="libc.so.6!clock_gettime+0x19", stack=None, ns_relative=False)
    base.update(kw)
    return CallEvent(**base)  # type: ignore[arg-type]


def test_fast_json_equals_generic() -> None:
    events = [
        _call(),
        _call(fallback=True, fallback_reason="cpu-time-clock",
              args={"clockid": "CLOCK_PROCESS_CPUTIME_ID", "tp": Addr(5)}),
        _call(func="gettimeofday", symbol="__vdso_gettimeofday",
              args={"tv": Addr(1), "tz": None}, out={"tv": Timeval(1, 2), "tz": Timezone(3, 4)}),
        _call(ret=-22, errno="EINVAL", out={"tp": Unreadable(0x10)}, caller_symbol=None,
              caller_text='0x10 we"ird', stack=("0x1 a!b+0x2",), ns_relative=True),
    ]
    for e in events:
        assert json.loads(jsonl.format_call(e)) == json.loads(json.dumps(jsonl.event_dict(e)))
        assert json.loads(jsonl.format_event(e))["event"] == "call"


def test_text_call_shape() -> None:
    line = text.format_call(_call(), timing=True)
    assert line == ("[pid 4712] clock_gettime(CLOCK_MONOTONIC, {tv_sec=239, tv_nsec=381677643})"
                    " = 0 <0.000000004>")
    fb = text.format_call(_call(fallback=True, fallback_reason="cpu-time-clock"))
    assert "[fallback]" in fb and "cpu-time-clock" in fb
    err = text.format_call(_call(ret=-22, errno="EINVAL"))
    assert err.endswith("= -22 EINVAL (Invalid argument)")
    t = text.format_call(_call(func="time", symbol="__vdso_time", args={"tloc": Addr(8)},
                               out={"tloc": 1700000000}, ret=1700000000))
    assert t == "[pid 4712] time([1700000000]) = 1700000000"


def test_clip_strings_size_and_marker() -> None:
    strs, cut = clip_strings("write", {1: b"a" * 40}, 32)
    assert strs == {1: b"a" * 32} and cut == (1,)
    strs, cut = clip_strings("write", {1: b"a" * 32}, 32)
    assert strs == {1: b"a" * 32} and cut == ()
    strs, cut = clip_strings("openat", {1: b"/" * 100}, 8)     # paths: PATH_MAX, as strace
    assert strs == {1: b"/" * 100} and cut == ()
    strs, cut = clip_strings("write", {1: b"abcdef"}, 3)
    e = SyscallEvent(1, 2, 1.0, 4, "write", (1, 0x8000000, 6), 6, None, 10, None, strs, cut)
    assert text.format_event(e) == '[pid 2] write(1, "abc"..., 6) = 6'


def test_invalid_byte_and_literal_escape_differ() -> None:
    invalid = SyscallEvent(1, 2, 1.0, 4, "write", (1, 0x8000000, 1), 1, None, 1, None,
                           {1: b"\xff"})
    literal = SyscallEvent(1, 2, 1.0, 4, "write", (1, 0x8000000, 4), 4, None, 1, None,
                           {1: b"\\xff"})
    a = json.loads(jsonl.format_event(invalid))["strings"]["1"]
    b = json.loads(jsonl.format_event(literal))["strings"]["1"]
    assert a == '"\\377"' and b == '"\\\\xff"' and a != b
    assert "\\377" in text.format_event(invalid) and "\\\\xff" in text.format_event(literal)


def test_syscall_strings_like_strace() -> None:
    e = SyscallEvent(1, 2, 1.0, 4, "write", (1, 0x8000000, 40), 40, None, 10, None,
                     {1: b'say "hi"\n\t\x00' + b"x" * 21}, (1,))
    line = text.format_event(e)
    # 11 bytes of text, then x up to strace's 32-byte limit, then `...`
    shown = '"say \\"hi\\"\\n\\t\\0' + "x" * 21 + '"...'
    assert line == f"[pid 2] write(1, {shown}, 40) = 40"
    doc = json.loads(jsonl.format_event(e))
    assert doc["args"] == [1, 0x8000000, 40] and doc["strings"]["1"] == shown
    neg = SyscallEvent(1, 2, 1.0, 295, "openat", (0xFFFFFF9C, 0x8000000, 0), -2, "ENOENT", 1,
                       None, {1: b"/nonexistent"})
    assert text.format_event(neg) == ('[pid 2] openat(-100, "/nonexistent", 0) = -2 ENOENT '
                                      "(No such file or directory)")
