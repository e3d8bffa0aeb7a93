"""olacache: compute frozen-teacher targets once, batched, into an embedding store."""

__version__ = "0.1.0"
