"""Data: tasks, tokenizers, sources, mixtures, packing and grain pipelines."""
