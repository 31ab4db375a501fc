"""`vdsotrace report FILE [--json | -c | -T | --stack | --hist | --perfetto OUT] [-e FUNCS]`:
a recording rendered offline by the live trace's own output (render/output.py and the
renderers behind it), as `trace` with the same options would have printed it."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from tracer.errors import UsageError
from tracer.events import AttachEvent, CallEvent, Event
from tracer.recording.format import Name, Process, SlotCaller, Slots, Trailer
from tracer.recording.reader import Reader
from tracer.recording.replay import ReplayStats, Selection, SlotReplay

__all__ = ["run_report"]


def _open(path: str) -> Any:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; give a recording written by "
                         "`vdsotrace record -o FILE`") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory; give a recording file") from None
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None


def _prescan(path: str) -> tuple[list[bytes], list[str], dict[str, Any] | None]:
    """The vDSO images, the functions traced (attach events, in order) and the trailer: what
    -e and -c need before the first event is rendered."""
    images: list[bytes] = []
    funcs: list[str] = []
    with _open(path) as f:
        r = Reader(f, path)
        try:
            for item in r.items():
                if isinstance(item, Process):
                    if item.image and item.image not in images:
                        images.append(item.image)
                elif isinstance(item, AttachEvent):
                    funcs.extend(str(x) for x in item.functions if x not in funcs)
                elif isinstance(item, CallEvent) and item.func not in funcs:
                    funcs.append(str(item.func))
                elif isinstance(item, Slots):
                    funcs.extend(p for p, _ in item.ctx.funcs if p not in funcs)
        except (TypeError, ValueError, AttributeError, KeyError, IndexError):
            pass                    # a forged event: the rendering pass says where
        trailer = r.trailer.values if r.trailer is not None else None
    listed = trailer.get("functions") if trailer is not None else None
    if isinstance(listed, list):
        funcs = [str(x) for x in listed] + [x for x in funcs if x not in listed]
    return images, funcs, trailer


def run_report(ns: argparse.Namespace) -> int:
    from tracer.render.output import open_output
    path = ns.file
    images, recorded, trailer = _prescan(path)
    sel = Selection(ns.funcs, images, recorded)
    f = _open(path)
    reader = Reader(f, path)
    header = reader.header
    out = open_output(ns.output or "-", json=ns.json, timing=ns.timing, summary=ns.summary)
    out.text_options(ns.stamps, ns.relative, ns.quiet, ns.only)
    names: dict[tuple[int, int], str | None] = {}
    out.add_views(hist=ns.hist, perfetto=ns.perfetto,
                  names=lambda pid, tid: names.get((pid, tid)))
    lost = trailer.get("lost", 0) if trailer else 0
    stats = ReplayStats(sel.order, header.get("clocksource"), lost if type(lost) is int else 0)
    depth = ns.stack
    had_stacks = False
    write, add = out.write_event, stats.add
    bad: str | None = None
    gone: list[bool] = []
    out.on_broken = lambda: gone.append(True)     # `report FILE | head`: stop reading
    slots = SlotReplay()

    def call(item: CallEvent) -> None:
        nonlocal had_stacks
        e: Event | None = sel.keep(item)
        if e is None:
            return
        st = e.stack  # type: ignore[union-attr]
        if st is not None:
            had_stacks = True
            # without --stack, as a live trace without it; --stack=N: N frames
            if not depth:
                e = e._replace(stack=None)  # type: ignore[union-attr]
            elif len(st) > depth:
                e = e._replace(stack=st[:depth])  # type: ignore[union-attr]
        add(e)
        write(e)

    try:
        for item in reader.items():
            if gone:
                break
            t = type(item)
            if t is CallEvent:
                call(item)
            elif t is Slots:
                # `record --inject`: ring slots, made calls as the live drain makes them
                for ev in slots.events(item):
                    call(ev)  # type: ignore[arg-type]
            elif t is SlotCaller:
                slots.caller(item)
            elif t is Name:
                if item.comm is not None or (item.pid, item.tid) not in names:
                    names[(item.pid, item.tid)] = item.comm
            elif t is Process or t is Trailer:
                continue
            else:
                e = sel.keep(item)
                if e is None:
                    continue
                add(e)
                write(e)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        # fields of the wrong type in records whose checksums hold: not written by vdsotrace
        bad = f"an event that cannot be rendered ({type(e).__name__}): a foreign or forged file"
    finally:
        f.close()
        if reader.trailer is not None:
            end = reader.trailer.values.get("end_time")
            out.end_time = end if isinstance(end, float) else None
        out.finish(stats.summary)
    if bad is not None:
        sys.stderr.write(f"vdsotrace: {path}: {bad}, at byte {reader.offset}: the events "
                         "before it are shown\n")
        return 1
    if depth and not had_stacks and not reader.damage:
        sys.stderr.write("vdsotrace: this recording has no stacks (record with --stack to "
                         "have them)\n")
    if reader.damage is not None:
        d = reader.damage
        sys.stderr.write(f"vdsotrace: {path}: {d.message}, at byte {d.offset}: the events "
                         "before it are shown\n")
        return 1
    return 0
