"""getcpu(unsigned *cpu, unsigned *node, struct getcpu_cache *tcache) (kernel/sys.c)."""
from __future__ import annotations

from tracer.decoders import Decoder, OutSpec, ptr, register

register(Decoder("getcpu", ("cpu", "node", "tcache"),
                 (OutSpec("cpu", 0, "u32"), OutSpec("node", 1, "u32")),
                 lambda a, abi: {"cpu": ptr(a[0]), "node": ptr(a[1]), "tcache": ptr(a[2])},
                 lambda a, r: "unknown"))
