"""Streaming merges of real checkpoints from mergekit-style YAML (``research-merge``)."""

from research.merging.stream.config import ConfigError, MergeConfig, load
from research.merging.stream.engine import MergeFailed, describe, make_plan, parse_size, run

__all__ = ["ConfigError", "MergeConfig", "MergeFailed", "describe", "load", "make_plan", "parse_size", "run"]
