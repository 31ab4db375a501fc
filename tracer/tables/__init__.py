"""Kernel tables generated from the UAPI headers by scripts/gen-tables.

Import the module you need (tracer.tables.errnos, .signals, .syscalls_i386,
.syscalls_x86_64); nothing is loaded here. hwcap_aarch64 is written by hand from the header its
docstring names (newer than the host's linux-libc-dev).
"""

__all__: list[str] = []
