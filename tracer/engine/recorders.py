"""--inject: draining the in-tracee recorders' rings into calls, their switch-off and
uninstall, and the notices of what they could not record."""
from __future__ import annotations

import time

from tracer.engine.state import _DRAIN_BATCH_STATS, _DRAIN_LEAVE_S, _Space, _Thread
from tracer.events import NoticeEvent
from tracer.engine.core import EngineCore


class Recorders(EngineCore):
    def _drain_recorders(self, limit: int = 65536) -> int:
        """--inject: turn what the stubs recorded into events (or, with -c, counts), at
        most `limit` records per ring."""
        n = 0
        for space in list(self.spaces.values()):
            rec = space.recorder
            if rec is None:
                continue
            if self.summary_only:
                n += rec.drain_stats(self._inject_stats, limit)
                continue
            records = rec.drain(limit)
            n += len(records)
            if not records:
                continue
            index = space.fidx_by_name
            signed = space.abi.signed
            threads = self.threads
            dead = self._dead
            for r in records:
                th = threads.get(r.tid) or dead.get(r.tid)
                if th is None or th.space is not space:
                    continue            # a forked child's call through the shared ring
                self._call_done(th, space, index[r.func], r.args, signed(r.ret), list(r.outs),
                                r.t_entry_ns, r.duration_ns, r.caller, r.fallback, None)
        return n

    def _uninstall(self, space: _Space, threads: list[_Thread]) -> None:
        """--inject: every thread stopped; switch the stubs off, restore the vDSO, unmap the
        ring, and emit what was still in it."""
        rec = space.recorder
        if rec is None or not rec.installed:
            return
        self._drain_for(_DRAIN_LEAVE_S)
        tids = [th.tid for th in threads if th.space is space and th.stopped]
        if not tids:
            self._emit(NoticeEvent(space.pid, space.pid, time.time(),
                                   "no thread of the process could be stopped (waiting for "
                                   "a vfork child?): the recorder stays in it"))
            return
        rec.uninstall(tids)
        self._drain_for(_DRAIN_LEAVE_S)
        for th in threads:
            if th.space is space and th.tid == tids[0]:
                th.stopped = True
        self._report_losses(space)

    def _finish_recorder(self, space: _Space) -> None:
        """The process exited or exec'd: everything still in its ring, then the losses."""
        space.recorder.producers_stopped()
        self._drain_for(_DRAIN_LEAVE_S)
        self._report_losses(space)
        space.recorder.abandon()

    def _drain_for(self, seconds: float) -> None:
        """Drain until the rings are empty, for at most `seconds`: on a way out the work must
        end whatever the rings say (a producer we do not stop, a forked child sharing a
        ring, may never let one run empty)."""
        deadline = time.monotonic() + seconds
        while self._drain_recorders(_DRAIN_BATCH_STATS) and time.monotonic() < deadline:
            pass

    def _report_losses(self, space: _Space) -> None:
        rec = space.recorder
        lost, corrupt = rec.lost(), rec.corrupt()
        self.lost_records += lost + corrupt
        now = time.time()
        if lost:
            self._emit(NoticeEvent(space.pid, space.pid, now,
                                   f"{lost} calls were not recorded: the ring was full"
                                   + ("" if rec.lossy else
                                      f" while the tracer was stopped or could not run (it "
                                      f"was silent for up to {rec.longest_silence:.2f} s; the "
                                      f"tracee waits {rec.patience_s} s at most)")))
        bad = rec.lost_counter_corrupt()
        if bad is not None:
            self._emit(NoticeEvent(space.pid, space.pid, now,
                                   f"the ring's count of calls not recorded was overwritten "
                                   f"(it read {bad}, more than the process can have made): "
                                   "how many calls were not recorded is unknown"))
        if corrupt:
            self._emit(NoticeEvent(space.pid, space.pid, now,
                                   f"{corrupt} corrupt ring records were skipped"))
        if rec.header_corrupt():
            self._emit(NoticeEvent(space.pid, space.pid, now,
                                   f"the ring's header was overwritten by the process "
                                   f"{rec.header_corrupt()} time(s): the calls in flight then "
                                   "were not recorded"))
        if rec.ring_broken():
            self._emit(NoticeEvent(space.pid, space.pid, now,
                                   "the ring could not be read any more (its header or file "
                                   "was damaged by the process): later calls were not "
                                   "recorded"))
        if rec.code_page_kept:
            self._emit(NoticeEvent(space.pid, space.pid, now,
                                   "the recorder's code page stays mapped: a thread may still "
                                   "return through it"))
        if rec.ring_kept:
            self._emit(NoticeEvent(space.pid, space.pid, now,
                                   "the recorder's ring stays mapped: a signal handler "
                                   "interrupted a thread while it wrote a record"))

    def _quiesce_recorders(self, limit_s: float = 5.0) -> None:
        """--inject, before stopping the tracee to leave: switch recording off and drain the
        ring while it runs on, so that it is held for milliseconds, not for as long as
        decoding a full ring takes (a second and more). What the stop finds is left over."""
        recs = [sp.recorder for sp in self.spaces.values()
                if sp.recorder is not None and sp.recorder.installed]
        if not recs:
            return
        for rec in recs:
            try:
                rec.stop_recording()
            except OSError:
                pass
        end = time.monotonic() + limit_s
        while self._drain_recorders() and time.monotonic() < end:
            pass
