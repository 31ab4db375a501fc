"""vdsotrace: a live tracer for the Linux vDSO."""
__version__ = "0.1.0"
