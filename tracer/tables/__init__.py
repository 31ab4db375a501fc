"""Kernel tables generated from the UAPI headers by scripts/gen-tables.

Import the module you need (tracer.tables.errnos, .signals, .syscalls_i386,
.syscalls_x86_64, .syscalls_aarch64); nothing is loaded here.
"""

__all__: list[str] = []
