"""Recordings: `vdsotrace record` writes the engine's events into a compact binary file,
`vdsotrace report` renders them later (format.py: the layout; replay.py: -c and -e offline)."""
from tracer.recording.format import MAGIC, VERSION, Reader, RecordingError, Writer

__all__ = ["MAGIC", "VERSION", "Reader", "RecordingError", "Writer"]
