"""Per-architecture facts and code (tracer.arch.aarch64 so far)."""
