"""Text and JSON for the inspection commands: auxv, vdso, disas, maps."""
from __future__ import annotations

import json
from typing import Any

from tracer.disasm import Gateway, Insn
from tracer.inspect import AuxvReport, VdsoMapping
from tracer.procfs import MapEntry
from tracer.render.escape import escape_text
from tracer.vdso import VdsoImage

__all__ = ["auxv_json", "auxv_text", "vdso_json", "vdso_text", "disas_text", "maps_text"]


def auxv_json(pid: int, abi: str, rep: AuxvReport) -> str:
    doc: dict[str, Any] = {
        "pid": pid, "abi": abi, "source": rep.source,
        "entries": [{"type": e.type, "name": e.name, "value": e.value, "text": e.text}
                    for e in rep.entries],
    }
    if rep.mismatch:
        doc["stack_mismatch"] = list(rep.mismatch)
    return json.dumps(doc)


def auxv_text(pid: int, abi: str, rep: AuxvReport) -> str:
    lines = [f"auxv of pid {pid} ({abi}), read from the {'initial stack, matches /proc/%d/auxv' % pid if rep.source == 'stack' else '/proc/%d/auxv' % pid}"]
    if rep.mismatch:
        lines.append(f"warning: the stack copy differs from the kernel's for {', '.join(rep.mismatch)}")
    width = max((len(e.name) for e in rep.entries), default=10)
    for e in rep.entries:
        lines.append(f"{e.name:<{width}}  {escape_text(e.text)}")
    return "\n".join(lines)


def _symbols(image: VdsoImage) -> list[dict[str, Any]]:
    return [{"name": s.name, "version": s.version, "value": s.value, "size": s.size,
             "bind": s.bind, "type": s.type} for s in image.symbols]


def vdso_json(image: VdsoImage, base: int, size: int, gw: Gateway | None,
              mapping: VdsoMapping | None = None, source: str | None = None) -> str:
    doc: dict[str, Any] = {
        "base": f"{base:#x}", "size": size, "image_size": image.image_size,
        "abi": image.abi.name, "soname": image.soname, "build_id": image.build_id,
        "linux_version": image.linux_version, "symbols": _symbols(image),
        "functions": [{"symbol": f.symbol, "name": f.plain, "aliases": list(f.aliases),
                       "value": f.image_offset, "size": f.size, "version": f.version}
                      for f in image.functions],
        "gateway": {"symbol": gw.symbol, "instructions": list(gw.instructions)} if gw else None,
    }
    if source:
        doc["source"] = source
    if mapping is not None:
        doc["vvar"] = [{"name": n, "start": f"{s:#x}", "end": f"{e:#x}", "readable": False}
                       for n, s, e in mapping.vvar]
    return json.dumps(doc)


def vdso_text(image: VdsoImage, base: int, size: int, gw: Gateway | None,
              mapping: VdsoMapping | None = None) -> str:
    lines = [
        f"{escape_text(image.soname or 'vDSO')} ({image.abi.name}) at {base:#x}, {size} bytes mapped, "
        f"{image.image_size} bytes of image",
        f"build-id {image.build_id or '(none)'}, Linux {image.linux_version or '?'}",
    ]
    if mapping is not None:
        for name, s, e in mapping.vvar:
            lines.append(f"{name} {s:#x}-{e:#x}: data pages, unreadable through ptrace (EIO)")
    if gw:
        lines.append(f"syscall gateway: {gw.symbol}: {', then '.join(gw.instructions)}")
    lines.append("")
    lines.append(f"{'offset':>8} {'size':>6}  {'version':<10} {'bind':<6} name")
    for sym in sorted(image.symbols, key=lambda x: (x.value, x.bind != "GLOBAL", x.name)):
        # the image is read from the tracee, which can rewrite its vDSO: names escaped
        lines.append(f"{sym.value:8x} {sym.size:6}  {escape_text(sym.version or ''):<10} "
                     f"{sym.bind:<6} {escape_text(sym.name)}")
    return "\n".join(lines)


def disas_text(symbol: str, base: int, insns: list[Insn]) -> str:
    lines = [f"{symbol} at {insns[0].address:#x}:" if insns else f"{symbol}: empty"]
    for i in insns:
        text = f"{i.mnemonic} {i.op_str}".strip()
        if i.target_symbol:
            text += f"  <{i.target_symbol}>"
        mark = "   ; enters the kernel" if i.is_syscall else ""
        lines.append(f"  {i.address:#x} <+{i.address - insns[0].address}>:\t"
                     f"{i.raw.hex(' '):<24} {text}{mark}")
    return "\n".join(lines)


def maps_text(maps: list[MapEntry]) -> str:
    out = []
    for m in maps:
        mark = ""
        if m.path == "[vdso]":
            mark = "   <- vDSO (code, readable)"
        elif m.path.startswith("[vvar"):
            mark = "   <- vDSO data (unreadable through ptrace)"
        elif m.path.startswith("[vdsotrace"):
            mark = "   <- vdsotrace"
        out.append(f"{m.start:012x}-{m.end:012x} {m.perms} {m.offset:08x} "
                   f"{escape_text(m.path)}{mark}")
    return "\n".join(out)
