"""Timelines in the Chrome trace-event JSON format (the Trace Event Format, JSON Object Format:
`{"traceEvents": [...]}`), which the Perfetto UI and chrome://tracing open.

- a process (`M` `process_name`) per traced pid, a track (`M` `thread_name`, "comm tid") per
  thread, each named once (at the end, by its comm when it was first seen, after an exec, or
  at the end if still alive);
- a complete event (`ph` "X", `ts`/`dur` in microseconds) per vDSO call, with its arguments,
  result and caller in `args`; a call that fell back into the kernel is named `func [fallback]`
  (category `vdso,fallback`, `args.fallback_reason`); the system calls of an i386 tracee
  (`__kernel_vsyscall`) are slices of category `syscall`, nested in the vDSO call that fell back
  into them;
- instants (`ph` "i"): signal deliveries and sigreturns on their thread (`s` "t"), attach,
  exec, exit and detach on their process (`s` "p"), notices global (`s` "g").

Times: an event's `time` is seconds since the epoch as a float, which at today's epoch resolves
about 0.24 us; vDSO calls last tens of nanoseconds. Slices on one thread must nest properly
(a viewer drops or misplaces a slice that overlaps another partially), so each slice is placed
from its `time` and its exact `duration_ns`: events come when calls return (children before
their parent); a slice that starts after the last one began is its child, and so is a system
call `nested_in` the function that fell back into it (whatever its time says: the engine times
system calls with its own stops, calls with the tracee's clock); a sibling starts no earlier
than the previous sibling ends; a parent covers its children. A slice moves by at most the
time's resolution, except such a fallback, stretched over its system calls. Slices are held per
thread until a few thousand wait (a later parent can still adopt them), then written in order,
so `ts` never decreases within a thread. `ts` counts from a whole second
(`otherData.ts_origin_unix_s`), written with three decimals (nanoseconds): small numbers, exact
in a reader's double.

Pure: fed with events (`add`) and a way to name threads, by the live trace or by a report.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import IO, Any, Callable

from tracer.events import (AttachEvent, CallEvent, DetachEvent, Event, ExecEvent,
                           ExitEvent, NoticeEvent, SignalEvent, SigreturnEvent, SyscallEvent)
from tracer.render.jsonl import json_value as _value
from tracer.render.jsonl import quote as _q

__all__ = ["PerfettoTimeline", "Names", "HOLD", "HOLD_ALL"]

Names = Callable[[int, int], "str | None"]     # (pid, tid) -> the thread's comm, if known
HOLD = 4096            # slices held per thread before the oldest are written
HOLD_ALL = 1 << 18     # slices held in all, before every thread's are written
_WRITE_EVERY = 512     # trace events buffered before a write to the file


@dataclass(slots=True)
class _Slice:
    q: int                           # start from the event's time, ns since the origin
    start: int                       # where it is placed, ns
    end: int
    line: str
    nested_in: str | None            # a system call made by this vDSO function's fallback
    children: list[_Slice] | None = None
    size: int = 1                    # slices in this subtree


@dataclass(slots=True)
class _Track:
    roots: list[_Slice] = field(default_factory=list)
    written_end: int = 0             # end of the last slice written
    held: int = 0


def _us(ns: int) -> str:
    return f"{ns // 1000}.{ns % 1000:03d}"


def _hex(v: int) -> str:
    return f"{v:#x}"




class PerfettoTimeline:
    def __init__(self, f: IO[str], names: Names | None = None, *, close: bool = True,
                 producer: str = "vdsotrace", hold: int = HOLD) -> None:
        self.f = f
        self._close_file = close
        self._names = names
        self._producer = producer
        self._hold = max(1, hold)
        self._origin: int | None = None
        self._tracks: dict[tuple[int, int], _Track] = {}
        self._pnames: dict[int, str | None] = {}
        self._tnames: dict[tuple[int, int], str | None] = {}
        self._gone: set[int] = set()                     # processes seen exiting
        self._gone_threads: set[tuple[int, int]] = set()
        self._buf: list[str] = []
        self._started = False
        self._closed = False
        self.broken = False
        self.slices = 0
        self._held = 0
        self._heads: dict[tuple[Any, ...], str] = {}
        self._args: dict[tuple[Any, ...], str] = {}
        self._callers: dict[tuple[Any, ...], str] = {}

    # ---------------------------------------------------------------- input
    def add(self, e: Event) -> None:
        if self._closed:
            return
        if self._origin is None:
            self._origin = max(0, int(e.time) - 1)
        t = type(e)
        if t is CallEvent:
            self._call(e)  # type: ignore[arg-type]
        elif t is SyscallEvent:
            self._syscall(e)  # type: ignore[arg-type]
        elif t is SignalEvent:
            assert isinstance(e, SignalEvent)
            self._instant(e.pid, e.tid, e.time, e.signame, "signal", "t", {
                "signo": e.signo, "handler": _hex(e.handler), "handler_symbol": e.handler_symbol,
                "restorer": _hex(e.restorer), "restorer_symbol": e.restorer_symbol,
                "resume_ip": _hex(e.resume_ip), "frame": _hex(e.frame)})
        elif t is SigreturnEvent:
            assert isinstance(e, SigreturnEvent)
            self._instant(e.pid, e.tid, e.time,
                          f"sigreturn !{e.anomaly}" if e.anomaly else "sigreturn",
                          "signal,anomaly" if e.anomaly else "signal", "t", {
                              "via": e.via, "signo": e.signo, "resume_ip": _hex(e.resume_ip),
                              "resume_symbol": e.resume_symbol, "anomaly": e.anomaly,
                              "resume_changed": e.resume_changed})
        elif t is AttachEvent:
            assert isinstance(e, AttachEvent)
            self._instant(e.pid, e.tid, e.time, "attach", "vdsotrace", "p", {
                "abi": e.abi, "vdso_base": _hex(e.vdso_base), "clocksource": e.clocksource,
                "vdso_fast_path": e.vdso_fast_path, "functions": list(e.functions),
                "spawned": e.spawned})
        elif t is DetachEvent:
            assert isinstance(e, DetachEvent)
            self._instant(e.pid, e.tid, e.time, "detach", "vdsotrace", "p", {"reason": e.reason})
        elif t is ExecEvent:
            assert isinstance(e, ExecEvent)
            self._track(e.pid, e.tid)
            self._pnames[e.pid] = self._read(e.pid, e.pid) or self._pnames.get(e.pid)
            self._tnames[(e.pid, e.tid)] = self._read(e.pid, e.tid) or self._pnames[e.pid]
            self._instant(e.pid, e.tid, e.time, "exec", "process", "p",
                          {"filename": e.filename, "abi": e.abi,
                           "vdso_base": _hex(e.vdso_base)})
        elif t is ExitEvent:
            assert isinstance(e, ExitEvent)
            self._track(e.pid, e.tid)
            self._gone_threads.add((e.pid, e.tid))
            if e.tid == e.pid:
                self._gone.add(e.pid)
            self._instant(e.pid, e.tid, e.time, "exit", "process", "p",
                          {"status": e.status, "signal": e.signal})
        elif t is NoticeEvent:
            assert isinstance(e, NoticeEvent)
            self._instant(e.pid, e.tid, e.time, "notice", "vdsotrace", "g",
                          {"message": e.message})

    def _ns(self, t: float) -> int:
        assert self._origin is not None
        return max(0, round((t - self._origin) * 1e9))

    def _call(self, e: CallEvent) -> None:
        hkey = (e.pid, e.tid, e.func, e.symbol, e.fallback)
        head = self._heads.get(hkey)
        if head is None:
            name, cat = (f"{e.func} [fallback]", "vdso,fallback") if e.fallback \
                else (e.func, "vdso")
            head = self._cache(self._heads, hkey,
                               f'{{"name":{_q(name)},"cat":"{cat}","ph":"X","pid":{e.pid},'
                               f'"tid":{e.tid},')
        akey = (e.func, *e.args.items())
        args = self._args.get(akey)
        if args is None:
            args = self._cache(self._args, akey, ",".join(
                [f"{_q(k)}:{_value(v)}" for k, v in e.args.items()]))
        ckey = (e.symbol, e.caller_text, e.caller_symbol)
        caller = self._callers.get(ckey)
        if caller is None:
            caller = self._cache(self._callers, ckey,
                                 f',"symbol":{_q(e.symbol)},"caller":{_q(e.caller_text)},'
                                 f'"caller_symbol":{_q(e.caller_symbol)}')
        out = ",".join([f"{_q(k)}:{_value(v)}" for k, v in e.out.items()])
        errno = _q(e.errno) if e.errno else "null"
        reason = _q(e.fallback_reason) if e.fallback else "null"
        tail = (f',"args":{{"args":{{{args}}},"ret":{e.ret},"errno":{errno},'
                f'"out":{{{out}}},"fallback":{"true" if e.fallback else "false"},'
                f'"fallback_reason":{reason},"duration_ns":{e.duration_ns}{caller}')
        if e.stack is not None:
            tail += ',"stack":' + json.dumps(list(e.stack))
        self._slice(e.pid, e.tid, e.time, e.duration_ns, head, tail + "}}", None,
                    e.func if e.fallback else None)

    def _syscall(self, e: SyscallEvent) -> None:
        args: dict[str, Any] = {"nr": e.nr, "args": list(e.args), "ret": e.ret,
                                "errno": e.errno, "duration_ns": e.duration_ns,
                                "nested_in": e.nested_in}
        if e.strings:
            args["strings"] = {str(i): v.decode("utf-8", "backslashreplace")
                               for i, v in e.strings.items()}
        head = (f'{{"name":{_q(e.name)},"cat":"syscall","ph":"X","pid":{e.pid},'
                f'"tid":{e.tid},')
        self._slice(e.pid, e.tid, e.time, e.duration_ns, head,
                    ',"args":' + json.dumps(args, separators=(",", ":")) + "}", e.nested_in,
                    None)

    @staticmethod
    def _cache(cache: dict[Any, str], key: Any, value: str) -> str:
        if len(cache) > 65536:
            cache.clear()
        cache[key] = value
        return value

    # ---------------------------------------------------------------- placing
    def _track(self, pid: int, tid: int) -> _Track:
        tr = self._tracks.get((pid, tid))
        if tr is None:
            self._name(pid, tid)
            tr = self._tracks[(pid, tid)] = _Track()
        return tr

    def _slice(self, pid: int, tid: int, time: float, dur: int, head: str, tail: str,
               nested_in: str | None, fell_back: str | None) -> None:
        """A complete event `head` "ts":…,"dur":… `tail`, placed on its thread."""
        tr = self._track(pid, tid)
        q = self._ns(time)
        dur = max(0, dur)
        roots = tr.roots
        k = len(roots)
        # Events come as calls return: the held slices that began after this one are its
        # children, and so are the system calls its fallback made, whatever their times say
        # (the engine times a system call from its own stops, a call from the tracee's clock)
        while k:
            r = roots[k - 1]
            if r.q > q or (fell_back is not None and r.nested_in == fell_back):
                k -= 1
            else:
                break
        children = roots[k:] if k < len(roots) else None
        start = q if children is None else min(q, children[0].start)
        start = max(start, roots[k - 1].end if k else tr.written_end)
        end = start + dur
        size = 1
        if children:
            last = max(c.end for c in children)
            if end < last or (end == last and start == children[0].start):
                # a parent ends after its children; one ns more where they would coincide,
                # so that no reader has to guess which contains which
                end = last + (start == children[0].start)
            size += sum(c.size for c in children)
            del roots[k:]
        roots.append(_Slice(q, start, end,
                            f'{head}"ts":{_us(start)},"dur":{_us(end - start)}{tail}',
                            nested_in, children, size))
        tr.held += 1
        self.slices += 1
        self._held += 1
        if tr.held > self._hold:
            self._release(tr, self._hold // 2)
        if self._held > HOLD_ALL:            # many threads: bound the memory all together
            for other in self._tracks.values():
                self._release(other, 0)

    def _release(self, tr: _Track, keep: int) -> None:
        """Write the oldest held slices of a track until `keep` are left."""
        n = 0
        while n < len(tr.roots) and tr.held > keep:
            r = tr.roots[n]
            self._write_tree(r)
            tr.held -= r.size
            self._held -= r.size
            tr.written_end = r.end
            n += 1
        del tr.roots[:n]

    def _write_tree(self, s: _Slice) -> None:
        stack = [s]
        while stack:
            x = stack.pop()
            self._emit(x.line)
            if x.children:
                stack.extend(reversed(x.children))

    # ---------------------------------------------------------------- names, instants
    def _name(self, pid: int, tid: int) -> None:
        """Names are read when a thread is first seen (a short-lived thread may be gone at
        the end), again after an exec, and at the end for threads still alive (a thread
        renamed after its first call); their metadata events are written at the end."""
        if pid not in self._pnames:
            self._pnames[pid] = self._read(pid, pid)
        self._tnames[(pid, tid)] = self._read(pid, tid)

    def _read(self, pid: int, tid: int) -> str | None:
        return self._names(pid, tid) if self._names is not None else None

    def _write_names(self) -> None:
        for (pid, tid), comm in self._tnames.items():
            if pid not in self._gone and (pid, tid) not in self._gone_threads:
                now = self._read(pid, tid)
                if now is not None:
                    comm = now
                    if tid == pid:
                        self._pnames[pid] = now
            comm = comm or self._pnames.get(pid)
            self._emit(json.dumps({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                                   "args": {"name": f"{comm} {tid}" if comm else str(tid)}},
                                  separators=(",", ":")))
        for pid, comm in self._pnames.items():
            self._emit(json.dumps({"name": "process_name", "ph": "M", "pid": pid, "tid": pid,
                                   "args": {"name": comm if comm is not None else str(pid)}},
                                  separators=(",", ":")))

    def _instant(self, pid: int, tid: int, time: float, name: str, cat: str, scope: str,
                 args: dict[str, Any]) -> None:
        if scope != "g":
            self._track(pid, tid)
        self._emit(json.dumps({"name": name, "cat": cat, "ph": "i", "s": scope, "pid": pid,
                               "tid": tid, "ts": 0, "args": args}, separators=(",", ":"))
                   .replace('"ts":0,', f'"ts":{_us(self._ns(time))},', 1))

    # ---------------------------------------------------------------- output
    def _emit(self, line: str) -> None:
        self._buf.append(line)
        if len(self._buf) >= _WRITE_EVERY:
            self._write()

    def _write(self) -> None:
        if not self._started:
            head = json.dumps({"displayTimeUnit": "ns",
                               "otherData": {"producer": self._producer,
                                             "ts_origin_unix_s": self._origin or 0,
                                             "ts_unit": "us"}})
            data = head[:-1] + ', "traceEvents": [\n' + ",\n".join(self._buf)
            self._started = True
        elif self._buf:
            data = ",\n" + ",\n".join(self._buf)
        else:
            return
        self._buf.clear()
        if self.broken:
            return
        try:
            self.f.write(data)
        except OSError:
            self.broken = True

    def close(self) -> None:
        """Write every held slice and end the JSON document (valid on every way out)."""
        if self._closed:
            return
        for tr in self._tracks.values():
            self._release(tr, 0)
        self._write_names()
        self._write()
        self._closed = True
        if not self.broken:
            try:
                self.f.write("\n]}\n")
                self.f.flush()
            except OSError:
                self.broken = True
        if self._close_file:
            try:
                self.f.close()
            except OSError:
                pass
