"""Recordings: `vdsotrace record` writes the engine's events into a compact binary file,
`vdsotrace report` renders them later (format.py: the layout; writer.py, reader.py; replay.py:
-c and -e offline)."""
from tracer.recording.format import MAGIC, VERSION, RecordingError
from tracer.recording.reader import Reader
from tracer.recording.writer import Writer

__all__ = ["MAGIC", "VERSION", "Reader", "RecordingError", "Writer"]
