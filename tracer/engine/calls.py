"""Call assembly: a raw call -> a CallEvent (or, with -c, counts only); i386's gateway's
system calls -> SyscallEvents."""
from __future__ import annotations

from collections.abc import Callable

from tracer.decoders import errno_name, out_decoder
from tracer.decoders.syscalls import clip_strings
from tracer.engine.options import TraceOptions
from tracer.engine.state import _NS_CLOCKS, _NS_READS, _Pending, _Space, _Thread
from tracer.engine.stats import Stats
from tracer.engine.symbols import Symbols
from tracer.events import CallEvent, Event, SyscallEvent, Unreadable
from tracer.tables import syscalls_i386
from tracer.vdso import GATEWAY_SYMBOL


class CallAssembly:
    """Turns the raw calls capture (a stop) and the recorders (a ring record) hand over into
    events for `sink`, counting them in `stats`; with `summary_only` (-c) it only counts."""

    def __init__(self, options: TraceOptions, symbols: Symbols, stats: Stats,
                 sink: Callable[[Event], None], mono_to_epoch: float,
                 fast_path: bool | None) -> None:
        self.options = options
        self.symbols = symbols
        self.stats = stats
        self.sink = sink
        self.mono_to_epoch = mono_to_epoch      # monotonic ns / 1e9 + this = epoch seconds
        self.fast_path = fast_path              # the clock source has a vDSO read mode
        self.summary_only = False               # -c: aggregate, build no events
        self._counters = stats.counters

    def call(self, th: _Thread, space: _Space, fidx: int, raw: tuple[int, ...],
             ret: int, outs: list[bytes | None], t0: int, dur: int, caller: int,
             fallback: bool, stack: tuple[int, ...] | None, site: int = 0) -> None:
        func = space.patcher.funcs[fidx]
        dec = space.decoders[fidx]
        c = self._counters[func.plain]
        c.calls += 1
        c.total_ns += dur
        st = self.stats
        st.calls += 1
        err = None if ret >= 0 or dec.ret_is_value else errno_name(ret)
        if err:
            c.errors += 1
        reason = None
        if fallback:
            c.fallbacks += 1
            st.fallbacks += 1
            reason = dec.fallback_reason(raw, ret)
            if reason is None:
                reason = "no-vdso-clocksource" if self.fast_path is False else "unknown"
            c.reasons[reason] = c.reasons.get(reason, 0) + 1
        if not space.traced:
            return
        pid = space.pid
        # -c's call sites: who called (under --inject, which does not find the site, the
        # return address), named now, while the process (and /proc/PID/root) exists
        key = site or caller
        site_name = space.site_names.get(key) or self.symbols.site_name(space, key)
        path = None
        if stack:
            path = tuple([e.partition(" ")[2] or e for e in self.symbols.stack_text(space, stack)])
        c.add_site(site_name, path, dur)
        th.last_call = (fidx, caller, stack, fallback, reason)
        if self.summary_only:
            return
        abi = space.abi
        out = {}
        for spec, data in zip(dec.outs, outs):
            addr = raw[spec.arg]
            if addr:
                out[spec.name] = (out_decoder(spec.layout, abi)(data) if data is not None
                                  else Unreadable(addr))
        names = space.names.get(caller) or self.symbols.symbolize(space, caller)
        akey = (fidx, raw)
        args = space.args_cache.get(akey)
        if args is None:        # the same arguments come again and again (a loop's tp)
            if len(space.args_cache) > 4096:
                space.args_cache.clear()
            args = space.args_cache[akey] = dec.decode_args(raw, abi)
        self.sink(CallEvent(pid, th.tid, t0 / 1e9 + self.mono_to_epoch, func.plain,
                            func.symbol, args, ret, err, out, fallback, reason, dur, caller,
                            names[0], names[1],
                            self.symbols.stack_text(space, stack) if stack is not None else None,
                            space.timens is not None and func.plain in _NS_READS
                            and args.get("clockid") in _NS_CLOCKS, site_name if site else None))

    def syscall(self, th: _Thread, space: _Space, p: _Pending, ret: int | None,
                t1: int) -> None:
        """A system call made through i386's gateway (`p` its entry) returned `ret`."""
        nr = p.args[6]
        c = self._counters[GATEWAY_SYMBOL]
        c.calls += 1
        c.total_ns += t1 - p.t0
        if ret is not None and -4096 < ret < 0:
            c.errors += 1
        if not space.traced:
            return
        nested = None
        if th.pending and not space.is_gateway[th.pending[-1].func]:
            nested = space.patcher.funcs[th.pending[-1].func].plain
        elif th.fb_marks and th.fb_marks[-1][0] > p.sp:
            nested = space.patcher.funcs[th.fb_marks[-1][1]].plain
        name = syscalls_i386.NAMES.get(nr, f"syscall_{nr}")
        nargs = syscalls_i386.NARGS.get(nr, 6)
        strs, cut = clip_strings(name, p.strs, self.options.string_size) if p.strs else (None, ())
        self.sink(SyscallEvent(space.pid, th.tid, p.t0 / 1e9 + self.mono_to_epoch, nr, name,
                               p.args[:nargs], ret, errno_name(ret) if ret is not None else None,
                               t1 - p.t0, nested, strs, cut))
