"""What `report` needs besides the events: the -c tables rebuilt from call events with the live
engine's own aggregation and summary code, and the -e selection made at report time."""
from __future__ import annotations

from typing import Any

from tracer.errors import UnknownFunction, UsageError
from tracer.events import AttachEvent, CallEvent, Event, SyscallEvent
from tracer.engine.control import summarize
from tracer.engine.stats import _Counter
from tracer.session import Summary, resolve_functions
from tracer.vdso import GATEWAY_SYMBOL, VdsoImage, parse_image

__all__ = ["ReplayStats", "Selection"]


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
