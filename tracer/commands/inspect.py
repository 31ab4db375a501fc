"""The inspection commands (auxv, vdso, dump, disas; and the console's `x`): where each reads
the process (a short ptrace peek, a dump file, or the engine's view while it traces) and what
it answers, for the CLI and the console alike. The text is made in render/inspect.py."""
from __future__ import annotations

from dataclasses import dataclass

from tracer import inspect, procfs, target
from tracer.disasm import disassemble, gateway
from tracer.errors import MemoryReadError, UnknownFunction, UsageError
from tracer.inspect import AuxvReport, VdsoMapping
from tracer.render.inspect import auxv_json, auxv_text, disas_text, vdso_json, vdso_text
from tracer.vdso import MAX_IMAGE, VdsoImage, parse_image

__all__ = ["VdsoView", "peek_auxv", "peek_vdso", "file_vdso", "auxv_output", "vdso_output",
           "disas_output", "write_image", "read_memory", "dump_vdso"]

DUMP_HINT = "vdsotrace dump"


@dataclass(frozen=True, slots=True)
class VdsoView:
    """A vDSO image and where it was read from."""
    image: VdsoImage
    base: int                         # its address in the process (0 for a file)
    size: int                         # bytes mapped (the file's size for a file)
    mapping: VdsoMapping | None       # the [vdso] and [vvar] lines (None for a file)
    source: str                       # "pid N" or the file's path


def peek_auxv(pid: int) -> tuple[str, AuxvReport]:
    """(ABI name, auxv) of a process not traced by us, read during a short ptrace stop."""
    with inspect.peek(pid) as p:
        return p.abi.name, inspect.read_auxv(p)


def peek_vdso(pid: int) -> VdsoView:
    with inspect.peek(pid) as p:
        rep = inspect.read_auxv(p)
        mapping = inspect.find_vdso(pid, rep.pairs)
        image = inspect.read_vdso(p, mapping)
    return VdsoView(image, mapping.base, mapping.size, mapping, f"pid {pid}")


def file_vdso(path: str) -> VdsoView:
    """A vDSO image written by `dump`."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_IMAGE + 1)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; give a vDSO image written by `{DUMP_HINT}`")
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory; give a vDSO image file")
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}")
    if not data:
        raise UsageError(f"{path}: empty file, not a vDSO image")
    image = parse_image(data)
    return VdsoView(image, 0, len(image.data), None, path)


def auxv_output(pid: int, abi: str, rep: AuxvReport, json: bool = False) -> str:
    return auxv_json(pid, abi, rep) if json else auxv_text(pid, abi, rep)


def vdso_output(v: VdsoView, json: bool = False) -> str:
    gw = gateway(v.image)
    if json:
        return vdso_json(v.image, v.base, v.size, gw, v.mapping, source=v.source)
    return vdso_text(v.image, v.base, v.size, gw, v.mapping)


def disas_output(v: VdsoView, symbol: str, syntax: str) -> str:
    func = v.image.function(symbol)
    if func is None:
        names = ", ".join(sorted({n for f in v.image.functions for n in f.aliases}))
        raise UnknownFunction(f"no function {symbol!r} in this vDSO; it exports: {names}")
    return disas_text(func.symbol, v.base, disassemble(v.image, func, v.base, syntax))


def write_image(v: VdsoView, path: str) -> str:
    """Write the image to PATH; the line that says so."""
    try:
        with open(path, "wb") as f:
            f.write(v.image.data)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}")
    return (f"wrote {len(v.image.data)} bytes of {v.image.soname or 'vDSO'} "
            f"({v.image.abi.name}) from {v.base:#x} to {path}")


def dump_vdso(pid: int, path: str) -> str:
    """`dump`: the process's vDSO, byte for byte (parsed first: never write what is not one)."""
    return write_image(peek_vdso(pid), path)


def read_memory(pid: int, addr: int, size: int) -> bytes:
    """Bytes of a process not traced by us (/proc/PID/mem); an unreadable address says why."""
    mem = target.Memory(pid)
    try:
        return mem.read(addr, size)
    except MemoryReadError as e:
        raise MemoryReadError(addr, size, _why_unreadable(pid, addr, e)) from e
    finally:
        mem.close()


def _why_unreadable(pid: int, addr: int, e: MemoryReadError) -> str:
    try:
        for m in procfs.read_maps(pid):
            if m.contains(addr):
                if m.path.startswith("[vvar"):
                    return f"{m.path} is the vDSO's data: the kernel refuses ptrace reads (EIO)"
                return f"{e.__cause__ or e} in {m.path or 'an anonymous mapping'}"
    except OSError:
        pass
    return "not mapped"
