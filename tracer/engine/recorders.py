"""--inject: draining the in-tracee recorders' rings into calls, their switch-off, and the
notices of what they could not record."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tracer.engine.calls import CallAssembly
from tracer.engine.state import _DRAIN_BATCH_STATS, _Space
from tracer.engine.stats import Stats
from tracer.inject.layout import NSLOTS as _RING_SLOTS
from tracer.events import Event, NoticeEvent

if TYPE_CHECKING:
    from tracer.engine.threads import Threads


class Recorders:
    """Reads the spaces and threads of the thread table (and the threads that exited, whose
    records may still be in a ring); hands calls to call assembly, counts to the statistics."""

    def __init__(self, table: Threads, assembly: CallAssembly, stats: Stats,
                 sink: Callable[[Event], None]) -> None:
        self.spaces = table.spaces
        self.threads = table.threads
        self._dead = table.dead
        self.assembly = assembly
        self.stats = stats
        self._emit = sink

    @property
    def summary_only(self) -> bool:
        return self.assembly.summary_only

    def _drain_recorders(self, limit: int = 65536) -> int:
        """Turn what the instruments that poll recorded into events (or, with -c, counts),
        at most `limit` records per instrument."""
        n = 0
        for space in list(self.spaces.values()):
            inst = space.instrument
            if not inst.polls:
                continue
            if self.summary_only:
                n += inst.drain_stats(self.stats.inject_stats, limit)
                continue
            records = inst.drain(limit)
            n += len(records)
            if not records:
                continue
            by_name = space.fidx_by_name
            index = [by_name.get(f.plain, -1) for f in inst.funcs]   # its fid -> the space's
            signed = space.abi.signed
            threads = self.threads
            dead = self._dead
            for r in records:
                th = threads.get(r.tid) or dead.get(r.tid)
                if th is None or th.space is not space:
                    continue            # a forked child's call through the shared ring
                self.assembly.call(th, space, index[r.fid], r.args, signed(r.ret), list(r.outs),
                                r.t_entry_ns, r.duration_ns, r.caller, r.fallback, None)
        return n

    def _finish_recorder(self, space: _Space) -> None:
        """The process exited or exec'd: everything still recorded, then the losses."""
        inst = space.instrument
        inst.producers_stopped()
        if inst.polls:
            self._drain_out()
        self._report_losses(space)
        inst.abandon()

    def _drain_out(self) -> None:
        """Drain until the rings are empty: on a way out every record a stub committed
        becomes an event (or a count), since one left behind would be a call neither shown
        nor counted as lost. Bounded by what the rings can hold, not by time (a full ring
        takes seconds to drain when the tracer gets little CPU): a ring holds at most
        _RING_SLOTS records and uninstall's pending list as many again; one round drains up
        to a batch from every ring, so the rings' share of a producer we do not stop (a forked
        child sharing a ring may never let one run empty) stays within the same bound."""
        rings = sum(1 for s in self.spaces.values() if s.instrument.polls)
        budget = rings * 2 * _RING_SLOTS
        while budget > 0:
            n = self._drain_recorders(_DRAIN_BATCH_STATS)
            if not n:
                break
            budget -= n

    def _report_losses(self, space: _Space) -> None:
        lost, notes = space.instrument.leave_report()
        self.stats.lost_records += lost
        now = time.time()
        for text in notes:
            self._emit(NoticeEvent(space.pid, space.pid, now, text))

    def _quiesce_recorders(self, limit_s: float = 5.0) -> None:
        """Before stopping the tracee to leave: switch recording off and drain what the
        instruments that poll recorded while it runs on, so that it is held for
        milliseconds, not for as long as decoding a full ring takes (a second and more).
        What the stop finds is left over."""
        insts = [sp.instrument for sp in self.spaces.values()
                 if sp.instrument.polls and sp.instrument.installed]
        if not insts:
            return
        for inst in insts:
            try:
                inst.stop_recording()
            except OSError:
                pass
        end = time.monotonic() + limit_s
        while self._drain_recorders() and time.monotonic() < end:
            pass
