"""olatrain: train an OLA-VLM-style MLLM on cached teacher targets (no teacher in memory)."""

__version__ = "0.1.0"
