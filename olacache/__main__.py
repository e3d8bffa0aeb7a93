"""`python -m olacache ...` (also `torchrun -m olacache build ...`)."""

from cli import olacache_app

olacache_app()
