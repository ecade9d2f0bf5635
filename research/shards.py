"""Writing safetensors checkpoints in shards, Hugging Face style."""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file


class ShardWriter:
    """Writes tensors into shards of at most ``shard_size`` bytes as they fill.

    ``finish()`` names them ``model-0000i-of-0000N.safetensors`` with a
    ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``),
    or ``model.safetensors`` when one shard suffices.
    """

    def __init__(self, directory: str, shard_size: int):
        self.dir, self.size = directory, shard_size
        self.cur, self.cur_bytes, self.parts, self.total = {}, 0, [], 0

    def add(self, name: str, arr: np.ndarray) -> None:
        if self.cur and self.cur_bytes + arr.nbytes > self.size:
            self.flush()
        self.cur[name] = np.ascontiguousarray(arr)
        self.cur_bytes += arr.nbytes
        self.total += arr.nbytes

    def flush(self) -> None:
        if not self.cur:
            return
        part = os.path.join(self.dir, f"part-{len(self.parts):05d}.safetensors")
        save_file(self.cur, part, metadata={"format": "pt"})
        self.parts.append((part, list(self.cur)))
        self.cur, self.cur_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.parts)
        if n == 1:
            os.rename(self.parts[0][0], os.path.join(self.dir, "model.safetensors"))
            return
        weight_map = {}
        for i, (part, names) in enumerate(self.parts):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(part, os.path.join(self.dir, fname))
            weight_map.update({nm: fname for nm in names})
        with open(os.path.join(self.dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
