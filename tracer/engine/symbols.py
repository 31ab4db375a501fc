"""Symbols and stacks: module maps, caller names, CFI-unwound stacks, the -c call site."""
from __future__ import annotations

import time

from tracer.engine.state import _MISSING, _OUTSIDE, _SITE_FRAMES, _Space, _Thread
from tracer.errors import ElfError, MemoryReadError
from tracer.modmap import is_c_library, ModuleMap
from tracer.unwind import ARCHES, unwind
from tracer.engine.options import TraceOptions


class Symbols:
    """Names and stacks for the calls of every traced space (caches kept in each _Space)."""

    def __init__(self, options: TraceOptions) -> None:
        self.options = options          # (demangle: read at each module map rebuild)

    def modules(self, space: _Space, addr: int) -> ModuleMap:
        """The space's module map, rebuilt when addr is not in it (a library loaded since),
        once per unknown address (anonymous memory, JIT code, is in the map: no rebuild)."""
        mm = space.modules
        if mm is not None and (mm.region_at(addr) is not None or addr in space.unmapped):
            return mm
        now = time.monotonic()
        try:
            mm = ModuleMap.from_pid(space.pid, space.image.data, self.options.demangle)
        except OSError:
            mm = ModuleMap([], space.image.data, demangle=self.options.demangle)
        space.modules, space.modules_time = mm, now
        space.names.clear()
        space.frames.clear()
        space.site_names.clear()
        space.site_rules.clear()
        if mm.region_at(addr) is None:
            if len(space.unmapped) > 4096:
                space.unmapped.clear()
            space.unmapped.add(addr)
        return mm

    def symbolize(self, space: _Space, addr: int) -> tuple[str, str | None]:
        """(caller, caller_symbol) for a return address, cached per address."""
        hit = space.names.get(addr)
        if hit is not None:
            return hit
        loc = self.modules(space, addr).locate(addr) if addr else None
        if loc is None:
            return f"{addr:#x}", None
        hit = (f"{addr:#x} {loc.caller}", loc.caller_symbol)
        if len(space.names) > 65536:
            space.names.clear()
        space.names[addr] = hit
        return hit

    def stack(self, space: _Space, th: _Thread, depth: int, pc: int | None = None,
               sp: int | None = None) -> tuple[int, ...]:
        """Return addresses at a function's entry (sp points at the first one), CFI-unwound.
        Callee-saved registers hold their entry values at entry and again after the return."""
        arch = space.abi
        if arch.name not in ARCHES:
            return ()                   # tracer/unwind.py has no rules for this arch yet
        buf = th.regs.buf
        index = arch.regs.index
        regs: dict[int | str, int] = {i: buf[index[n]] for i, n in enumerate(arch.dwarf_regs)}
        regs["pc"] = buf[arch.PC] if pc is None else pc
        regs["sp"] = buf[arch.SP] if sp is None else sp
        try:
            # the map must know the caller's object (it may have been loaded since we looked)
            ret0 = space.mem.read_word(int(regs["sp"]), space.abi.word)
        except MemoryReadError:
            return ()
        self.modules(space, int(regs["sp"]))  # a thread's stack mapped since: rebuild
        mm = self.modules(space, ret0)
        try:
            return tuple(unwind(regs, space.mem.read, mm, space.abi.name, depth))
        except (ElfError, MemoryReadError):
            return ()

    def site_name(self, space: _Space, addr: int) -> str:
        """`prog!main+0x2a` (or `prog+0x1234`, or the address) for -c and `site`."""
        text, sym = self.symbolize(space, addr)
        name = sym or text.partition(" ")[2] or text
        if len(space.site_names) > 65536:
            space.site_names.clear()
        space.site_names[addr] = name
        return name

    def site(self, space: _Space, th: _Thread, ret: int, entry_sp: int, window: bytes,
              wbase: int) -> int:
        """The return address of the first frame outside the C library, for a call entered
        with sp = entry_sp ([entry_sp] = ret): ret itself, unless the C library made the call
        (its clock_gettime wrapper): then the next frames' return addresses, found with the
        CFI of each return address (cached per address: its row is fixed), read from
        `window` (the stack bytes at wbase) when they are in it. 0 when unknown."""
        rules = space.site_rules
        rule = rules.get(ret, _MISSING)
        if rule is _OUTSIDE:
            return ret                      # the common case: called from outside libc
        word = space.abi.word
        sp = entry_sp + word                # the caller's sp after the call returns
        for _ in range(_SITE_FRAMES):
            if rule is _MISSING:
                rule = self._site_rule(space, ret)
            if rule is _OUTSIDE:
                return ret
            if rule is None:
                return self._site_unwound(space, th, entry_sp)
            cfa = sp + rule[0]
            off = cfa + rule[1] - wbase
            if 0 <= off <= len(window) - word:
                ret = int.from_bytes(window[off:off + word], "little")
            else:
                try:
                    ret = space.mem.read_word(cfa + rule[1], word)
                except MemoryReadError:
                    return 0
            sp = cfa
            rule = rules.get(ret, _MISSING)
        return 0

    def _site_rule(self, space: _Space, ret: int) -> tuple[int, int] | None:
        mm = self.modules(space, ret)
        module = mm.module_at(ret)
        rule: tuple[int, int] | None = _OUTSIDE
        if module is not None and is_c_library(module.short_name):
            rule = None
            found = mm.frame_rule(ret - 1)
            row = found[1] if found is not None else None
            arch = ARCHES.get(space.abi.name)      # None: no unwinder for it (yet)
            if (arch is not None and row is not None and row.offsets is not None
                    and row.cfa_reg == arch.sp):
                ra = [off for reg, off in row.offsets if reg == arch.ra]
                if ra:
                    rule = (row.cfa_offset, ra[0])
        rules = space.site_rules
        if len(rules) > 65536:
            rules.clear()
        rules[ret] = rule
        return rule

    def _site_unwound(self, space: _Space, th: _Thread, entry_sp: int) -> int:
        """The site through a full unwind (a C library frame whose CFA is not sp-based)."""
        try:
            entry_pc = space.base   # any vDSO address: the walk starts from [sp]
            for a in self.stack(space, th, _SITE_FRAMES + 1, entry_pc, entry_sp):
                module = self.modules(space, a).module_at(a)
                if module is None or not is_c_library(module.short_name):
                    return a
        except (ElfError, MemoryReadError):
            pass
        return 0

    def stack_text(self, space: _Space, addrs: tuple[int, ...]) -> tuple[str, ...]:
        frames = space.frames
        out = []
        for a in addrs:
            text = frames.get(a)
            if text is None:
                loc = self.modules(space, a).locate(a)
                text = loc.stack_entry if loc is not None else f"{a:#x}"
                if len(frames) > 65536:
                    frames.clear()
                frames[a] = text
            out.append(text)
        return tuple(out)

    def code_name(self, space: _Space, addr: int, trampoline: bool = False) -> str | None:
        """`symbol` or `symbol+0xoff` for a code address (not a return address); for a
        trampoline the bare symbol that contains it, or its address."""
        loc = self.modules(space, addr).locate(addr, is_return_address=False)
        if loc is not None and loc.symbol is not None:
            if trampoline or loc.symbol_offset == 0:
                return loc.symbol
            return f"{loc.symbol}+{loc.symbol_offset:#x}"
        # the C library's restorer has no dynamic symbol: told by its code (a trampoline's
        # address is that of its system call instruction, the restorer's last)
        arch = space.abi
        rc = arch.restorer_code
        if rc:
            try:
                code = space.mem.read(addr - (len(rc) - len(arch.syscall_insn)) if trampoline
                                      else addr, len(rc))
            except MemoryReadError:
                code = b""
            if code == rc:
                return "__restore_rt"
        if trampoline:
            return f"{addr:#x}"
        return loc.caller if loc is not None else None
