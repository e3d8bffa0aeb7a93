"""`python -m olatrain ...` (also `torchrun -m olatrain run ...`)."""

from cli import olatrain_app

olatrain_app()
