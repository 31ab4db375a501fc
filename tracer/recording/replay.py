"""What `report` needs besides the events: the -c tables rebuilt from call events with the live
engine's own aggregation and summary code, the -e selection made at report time, and the ring
slots of `record --inject` turned into calls by the live drain's own code."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, cast

from tracer.abi import Abi, abi_by_name
from tracer.decoders import Decoder, for_function, out_size
from tracer.engine.calls import CallAssembly
from tracer.engine.options import TraceOptions
from tracer.engine.stats import Stats
from tracer.inject import batch
from tracer.inject import layout as L
from tracer.inject.ring import PID_MAX_LIMIT, slot_records
from tracer.recording.format import SlotCaller, SlotContext, Slots

from tracer.errors import TracerError, UnknownFunction, UsageError
from tracer.events import AttachEvent, CallEvent, Event, SyscallEvent
from tracer.engine.control import summarize
from tracer.engine.stats import _Counter
from tracer.session import Summary, resolve_functions
from tracer.vdso import GATEWAY_SYMBOL, VdsoImage, parse_image

__all__ = ["ReplayStats", "Selection", "SlotReplay"]


class ReplayStats:
    """The live engine's -c counters, fed from recorded events as the engine feeds them
    (engine.calls.CallAssembly.call / syscall), so that `summary()`, which is the live
    engine's own method, prints the same tables. A call's -c site is its `site`, or, where
    the engine found none (under --inject), its caller's name, as the engine names it."""


    def __init__(self, functions: list[str], clocksource: str | None, lost: int) -> None:
        self.counters: dict[str, Any] = {f: _Counter() for f in functions}
        self.inject_stats: dict[str, Any] = {}
        self.clocksource = clocksource
        self.lost_records = lost

    def summary(self) -> Summary:
        """The live engine's own summary code (engine.control.summarize) over these counters."""
        return summarize(self)

    def add(self, e: Event) -> None:
        if type(e) is CallEvent:
            assert isinstance(e, CallEvent)
            c = self.counters.get(e.func)
            if c is None:
                c = self.counters[e.func] = _Counter()
            c.calls += 1
            c.total_ns += e.duration_ns
            if e.errno:
                c.errors += 1
            if e.fallback:
                c.fallbacks += 1
                reason = e.fallback_reason or "unknown"
                c.reasons[reason] = c.reasons.get(reason, 0) + 1
            site = e.site
            if site is None:
                site = (e.caller_symbol or e.caller_text.partition(" ")[2]
                        or e.caller_text)
            path = None
            if e.stack:
                path = tuple([s.partition(" ")[2] or s for s in e.stack])
            c.add_site(site, path, e.duration_ns)
        elif isinstance(e, SyscallEvent):
            c = self.counters.get(GATEWAY_SYMBOL)
            if c is None:
                c = self.counters[GATEWAY_SYMBOL] = _Counter()
            c.calls += 1
            c.total_ns += e.duration_ns
            if e.ret is not None and -4096 < e.ret < 0:
                c.errors += 1


class Selection:
    """`report -e FUNCS`: the functions a live `trace -e FUNCS` of the same process would have
    traced, resolved against the recorded vDSO images as the engine resolves them, and kept
    only among those the recording traced."""

    def __init__(self, specs: list[str] | None, images: list[bytes],
                 recorded: list[str]) -> None:
        self.specs = specs
        self.recorded = recorded
        self.order: list[str] = list(recorded)
        self.names: set[str] = set(recorded)
        if specs is None:
            return
        parsed: list[VdsoImage] = []
        for data in images:
            try:
                parsed.append(parse_image(data))
            except Exception:       # an image that does not parse: names from events only
                continue
        names = [n.strip() for spec in specs for n in spec.split(",") if n.strip()]
        order: list[str] = []
        if parsed:
            for n in names:
                key = n[1:] if n.startswith("!") else n
                if key not in ("all", "*") and not any(im.function(key) for im in parsed):
                    known = ", ".join(dict.fromkeys(f.plain for im in parsed
                                                    for f in im.functions))
                    raise UnknownFunction(f"no vDSO function {key!r} in the recorded vDSO; "
                                          f"it exports: {known}")
            for im in parsed:
                mine = [n for n in names
                        if (n[1:] if n.startswith("!") else n) in ("all", "*")
                        or im.function(n[1:] if n.startswith("!") else n)]
                try:
                    order.extend(f.plain for f in resolve_functions(im, mine or [""]))
                except UsageError:
                    pass            # this image has none of the names
        else:
            from tracer.vdso import plain_name
            inc = [plain_name(n) for n in names if not n.startswith("!")]
            exc = {plain_name(n[1:]) for n in names if n.startswith("!")}
            base = recorded if not inc or set(inc) & {"all", "*"} else inc
            order = [n for n in base if n not in exc]
        order = list(dict.fromkeys(order))
        missing = [n for n in order if n not in recorded]
        kept = [n for n in order if n in recorded]
        if not kept:
            raise UsageError(f"-e {','.join(names)}: "
                             + (f"{', '.join(missing)} {'was' if len(missing) == 1 else 'were'}"
                                " not recorded" if missing else "selects no function")
                             + f" (the recording traced: {', '.join(recorded) or 'nothing'})")
        self.order = kept
        self.names = set(kept)

    def keep(self, e: Event) -> Event | None:
        """The event as a live trace with this selection would have shown it, or None."""
        if self.specs is None:
            return e
        t = type(e)
        if t is CallEvent:
            return e if e.func in self.names else None  # type: ignore[union-attr]
        if t is SyscallEvent:
            return e if GATEWAY_SYMBOL in self.names else None
        if t is AttachEvent:
            assert isinstance(e, AttachEvent)
            import dataclasses
            return dataclasses.replace(e, functions=tuple(f for f in self.order
                                                          if f in e.functions))
        return e


class _Func:
    __slots__ = ("plain", "symbol")

    def __init__(self, plain: str, symbol: str) -> None:
        self.plain, self.symbol = plain, symbol


class _Patcher:
    __slots__ = ("funcs",)

    def __init__(self, funcs: list[_Func]) -> None:
        self.funcs = funcs


class _Space:
    """What engine.calls.CallAssembly.call reads of an engine space (engine/state.py's
    _Space), as the recording says it was: the recorder's functions (index = the ring's fid),
    their decoders, the ABI, the caller names the engine gave, the time namespace."""

    def __init__(self, ctx: SlotContext, abi: Abi, names: dict[int, tuple[str, str | None]]
                 ) -> None:
        self.pid = ctx.pid
        self.abi = abi
        self.patcher = _Patcher([_Func(p, s) for p, s in ctx.funcs])
        self.decoders: list[Decoder] = [for_function(p) for p, _ in ctx.funcs]
        self.traced = True
        self.names = names                       # return address -> (caller, caller_symbol)
        self.site_names: dict[int, str] = {}
        self.args_cache: dict[tuple[int, tuple[int, ...]], dict[str, Any]] = {}
        self.timens: dict[str, tuple[int, int]] | None = {} if ctx.timens else None


class _Thread:
    __slots__ = ("tid", "last_call")

    def __init__(self) -> None:
        self.tid = 0
        self.last_call: tuple[Any, ...] | None = None


class _Symbols:
    """engine.symbols.Symbols' naming, from the names recorded (SLOTCALLER) instead of the
    process's module map; an address the engine did not name is named as it names one
    outside every mapping."""

    def symbolize(self, space: _Space, addr: int) -> tuple[str, str | None]:
        hit = space.names.get(addr)
        return hit if hit is not None else (f"{addr:#x}", None)

    def site_name(self, space: _Space, addr: int) -> str:
        text, sym = self.symbolize(space, addr)
        name = sym or text.partition(" ")[2] or text
        space.site_names[addr] = name
        return name


class SlotReplay:
    """The SLOTS of a version-2 recording -> the CallEvents the live drain made of the same
    slots: ring.slot_records (the drain's decoding of a run of slots) and CallAssembly.call
    (the live call assembly), fed as engine.recorders.Recorders feeds them."""

    def __init__(self) -> None:
        self._names: dict[int, dict[int, tuple[str, str | None]]] = {}
        self._ctx: dict[SlotContext, tuple[CallAssembly, _Space, list[int], list[tuple[int, ...]],
                                           list[int], list[Event]]] = {}
        self._thread = _Thread()

    def caller(self, c: SlotCaller) -> None:
        self._names.setdefault(c.pid, {})[c.addr] = (c.text, c.symbol)

    def _context(self, ctx: SlotContext) -> tuple[CallAssembly, _Space, list[int],
                                                  list[tuple[int, ...]], list[int],
                                                  list[Event]]:
        hit = self._ctx.get(ctx)
        if hit is None:
            try:
                abi = abi_by_name(ctx.abi)
            except TracerError as e:
                raise ValueError(f"slots of an unknown ABI {ctx.abi!r}") from e
            space = _Space(ctx, abi, self._names.setdefault(ctx.pid, {}))
            nargs = [min(d.nargs, L.MAX_ARGS) for d in space.decoders]
            outsz = [tuple(out_size(o.layout, abi) for o in d.outs[:L.NOUTS])
                     for d in space.decoders]
            max_flags = [min(8, 1 << (1 + len(z))) for z in outsz]
            sink: list[Event] = []
            stats = Stats(None)
            stats.counters = defaultdict(_Counter)
            assembly = CallAssembly(TraceOptions(), cast(Any, _Symbols()), stats,
                                    sink.append, ctx.mono_to_epoch, ctx.fast_path)
            hit = self._ctx[ctx] = (assembly, space, nargs, outsz, max_flags, sink)
        return hit

    def events(self, s: Slots) -> list[Event]:
        assembly, space, nargs, outsz, max_flags, sink = self._context(s.ctx)
        if len(batch.valid(s.data, max_flags, PID_MAX_LIMIT)) * L.SLOT != len(s.data):
            raise ValueError("ring slots that no stub writes")
        th = self._thread
        call, signed, sp = assembly.call, space.abi.signed, cast(Any, space)
        for r in slot_records(s.data, [p for p, _ in s.ctx.funcs], nargs, outsz, s.rate,
                              s.tsc0, s.ns0):
            th.tid = r.tid
            call(cast(Any, th), sp, r.fid, r.args, signed(r.ret), list(r.outs), r.t_entry_ns,
                 r.duration_ns, r.caller, r.fallback, None)
        out = sink[:]
        sink.clear()
        return out
