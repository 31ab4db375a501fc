"""Moved to tracer/inject/x86/stubs64.py (per-arch code lives in modules named for their arch);
this name stays for its importers."""
from tracer.inject.x86.stubs64 import *  # noqa: F403
from tracer.inject.x86.stubs64 import __all__  # noqa: F401
