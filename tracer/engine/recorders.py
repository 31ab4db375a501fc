"""--inject: draining the in-tracee recorders' rings into calls, their switch-off, and the
notices of what they could not record."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from tracer.engine.calls import CallAssembly
from tracer.engine.state import _DRAIN_BATCH_STATS, _Space
from tracer.engine.stats import Stats
from tracer.engine.symbols import Symbols
from tracer.events import Event, NoticeEvent
from tracer.inject.layout import NSLOTS as _RING_SLOTS
from tracer.inject.ring import RingReader
from tracer.recording.format import SlotContext

if TYPE_CHECKING:
    from tracer.engine.threads import Threads
    from tracer.inject import RawRecord
    from tracer.inject.batch import SlotRun
# (inject/batch.py, numpy's door, is imported where a ring is drained: a trace without
# --inject does without numpy)

_ERR_LO = (1 << 64) - 4095           # -4095..-1 as an unsigned word: -MAX_ERRNO..-1
_ERR_LO32 = (1 << 32) - 4095


class SlotSink(Protocol):
    """Takes whole runs of ring slots instead of one event per call: `record` writes them as
    they are, the JSON output formats them (render/jsonl.py). `callers` names every return
    address of the run as the engine names a call's caller."""
    # slots drained between two looks at waitpid, and taken at once (with a heartbeat before
    # each piece of a longer drain, as on the way out): about a millisecond or two of its
    # work, so that a thread's stop (a clone, a signal) is not kept waiting longer
    slots_per_drain: int

    def write_slots(self, ctx: SlotContext, run: SlotRun,
                    callers: dict[int, tuple[str, str | None]]) -> bool:
        """False: this run is not for the sink (it then goes the events' way)."""
        ...


class Recorders:
    """Reads the spaces and threads of the thread table (and the threads that exited, whose
    records may still be in a ring); hands calls to call assembly (or runs of slots to the
    slot sink), counts to the statistics."""
    slot_sink: SlotSink | None = None      # set by the trace command when its output takes runs

    def __init__(self, table: Threads, assembly: CallAssembly, stats: Stats, symbols: Symbols,
                 sink: Callable[[Event], None]) -> None:
        self.spaces = table.spaces
        self.threads = table.threads
        self._dead = table.dead
        self.assembly = assembly
        self.stats = stats
        self.symbols = symbols
        self._emit = sink

    @property
    def summary_only(self) -> bool:
        return self.assembly.summary_only

    def _drain_recorders(self, limit: int = 65536) -> int:
        """Turn what the instruments that poll recorded into events (or, with -c, counts;
        or, to a slot sink, runs of slots), at most `limit` records per instrument."""
        n = 0
        for space in list(self.spaces.values()):
            inst = space.instrument
            if not inst.polls:
                continue
            if self.summary_only:
                n += inst.drain_stats(self.stats.inject_stats, limit)
                continue
            by_name = space.fidx_by_name
            index = [by_name.get(f.plain, -1) for f in inst.funcs]   # its fid -> the space's
            if self.slot_sink is not None and isinstance(inst, RingReader):
                from tracer.inject import batch
                from tracer.inject.batch import SlotRun
                items = inst.drain_view(limit)
                for it in items:
                    if type(it) is SlotRun:
                        n += len(it)
                        # a heartbeat between pieces: a tracer slowed down (a loaded machine
                        # gives it a few % of a CPU) is still draining, and its tracee waits
                        for piece in batch.pieces(it, self.slot_sink.slots_per_drain):
                            inst.heartbeat()
                            if not self._slot_run(space, inst, index, piece):
                                self._assemble(space, index, inst.slot_records(piece))
                    else:
                        n += 1
                        self._assemble(space, index, [it])  # type: ignore[list-item]
                continue
            records = inst.drain(limit)
            n += len(records)
            if records:
                self._assemble(space, index, records)
        return n

    def _assemble(self, space: _Space, index: list[int], records: list[RawRecord]) -> None:
        """Each record into a call event (engine/calls.py)."""
        signed = space.abi.signed
        threads = self.threads
        dead = self._dead
        for r in records:
            th = threads.get(r.tid) or dead.get(r.tid)
            if th is None or th.space is not space:
                continue            # a forked child's call through the shared ring
            self.assembly.call(th, space, index[r.fid], r.args, signed(r.ret), list(r.outs),
                               r.t_entry_ns, r.duration_ns, r.caller, r.fallback, None)

    def _slot_run(self, space: _Space, inst: RingReader, index: list[int],
                  run: SlotRun) -> bool:
        """A run of slots to the slot sink, counted as CallAssembly.call counts calls (calls,
        time, errors, fallbacks; -c's sites and reasons are -c's, which drains with
        drain_stats). Slots of threads not of this space (a forked child's calls through the
        shared ring) are left out, as the events' way leaves them. False when the run must go
        the events' way instead: a duration too long to sum exactly, or a run the sink does
        not take."""
        from tracer.inject import batch
        assert self.slot_sink is not None
        threads, dead = self.threads, self._dead
        tids = batch.distinct(run.slots["tid"])
        mine = []
        for tid in tids:
            th = threads.get(tid) or dead.get(tid)
            if th is not None and th.space is space:
                mine.append(tid)
        if len(mine) != len(tids):
            if not mine:
                return True
            run = batch.only_tids(run, mine)
        abi = space.abi
        # (validated slots: every flag below 8, every tid plausible)
        totals = batch.aggregate(run.slots, [8] * len(inst.funcs),
                                 [d.ret_is_value for d in inst.decoders],
                                 _ERR_LO if abi.word == 8 else _ERR_LO32, abi.mask, run.rate,
                                 1 << 32)
        if totals is None:
            return False
        funcs = space.patcher.funcs
        if space.traced:
            symbolize = self.symbols.symbolize
            names = space.names
            callers = {}
            for a in batch.distinct(run.slots["caller"]):
                callers[a] = names.get(a) or symbolize(space, a)
            ctx = SlotContext(space.pid, abi.name,
                              tuple((funcs[i].plain, funcs[i].symbol) for i in index),
                              self.assembly.mono_to_epoch, self.assembly.fast_path,
                              space.timens is not None)
            if not self.slot_sink.write_slots(ctx, run, callers):
                return False            # (counted then by the events' way)
        counters, st = self.stats.counters, self.stats
        for t in totals:
            c = counters[funcs[index[t.fid]].plain]
            c.calls += t.calls
            c.total_ns += t.total_ns
            c.errors += t.errors
            c.fallbacks += t.fallbacks
            st.calls += t.calls
            st.fallbacks += t.fallbacks
        return True

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
