"""Read checkpoints tensor by tensor: HF directories (single or sharded
safetensors), single ``.safetensors`` files, and this project's orbax runs."""

from __future__ import annotations

import os

import numpy as np

from research.safetensors_io import CheckpointError, SafetensorsError, checkpoint_files
from research.safetensors_io import open_checked as _open


class TensorSource:
    """Lazy access to one model's tensors; only headers are read until ``read``,
    which ``pread``s one tensor (no memory map: see ``research.safetensors_io``)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: no such model (file or directory)")
        self._arrays = None
        if os.path.isdir(path) and (os.path.isdir(os.path.join(path, "checkpoints")) or _is_orbax_step(path)):
            self._load_orbax(path)
            return
        self._files = checkpoint_files(path)
        self._handles = {}
        self.shapes, self.dtypes = {}, {}
        for name, fp in self._files.items():
            entries = self._handle(fp).entries
            if name not in entries:
                raise CheckpointError(f"{fp}: tensor {name} is named in the index but not in this shard")
            dtype, shape, _ = entries[name]
            self.shapes[name], self.dtypes[name] = shape, dtype

    def _handle(self, fp):
        if fp not in self._handles:
            self._handles[fp] = _open(fp)
        return self._handles[fp]

    def _load_orbax(self, path):
        """Our training runs: the latest step's parameters (read whole, not streamed; the
        optimizer state is not read), on this process's first device.  A ``scan_layers``
        run's stacked tensors are split per layer (``layers.3.attn.q_proj``), so the
        merge sees the same names whichever layout the run trained in."""
        import jax

        from research.merging.tree import path_name
        from research.models import scan
        from research.training.checkpoint import Checkpointer

        ck_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else os.path.dirname(path)
        ck = Checkpointer(ck_dir, save_every=0, keep=1, async_save=False)
        try:
            step = ck.latest() if not _is_orbax_step(path) else int(os.path.basename(path))
            if step is None:
                raise CheckpointError(f"{path}: an orbax directory without checkpoints")
            here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            meta = ck.manager.item_metadata(step)["state"]["params"]
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), meta)
            params = ck.restore_params(step, target)
        finally:
            ck.close()
        flat = {path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        self._arrays = scan.to_flat_layout(flat, scanned=False)
        self.shapes = {k: v.shape for k, v in self._arrays.items()}
        self.dtypes = {k: v.dtype for k, v in self._arrays.items()}

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shapes[name])) * self.dtypes[name].itemsize

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """One tensor, or its leading-axis slice ``rows = (start, stop)``."""
        if self._arrays is not None:
            a = self._arrays[name]
            return a if rows is None else a[rows[0]:rows[1]]
        fp = self._files[name]
        try:
            return self._handle(fp).read(name, rows)
        except (SafetensorsError, OSError) as e:
            raise CheckpointError(f"{fp}: cannot read tensor {name} ({e})") from None

    def config_json(self) -> str | None:
        d = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
        p = os.path.join(d, "config.json")
        return p if os.path.isfile(p) else None


def _is_orbax_step(path: str) -> bool:
    return os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state"))
