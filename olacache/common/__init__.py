"""Plumbing shared by both packages: process/device runtime, the preset cache directory, YAML config I/O."""
