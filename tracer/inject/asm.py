"""Moved to tracer/inject/x86/asm.py (per-arch code lives in modules named for their arch);
this name stays for its importers."""
from tracer.inject.x86.asm import *  # noqa: F403
from tracer.inject.x86.asm import __all__  # noqa: F401
