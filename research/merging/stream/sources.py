"""Read checkpoints tensor by tensor: HF directories (single or sharded
safetensors), single ``.safetensors`` files, this project's orbax runs, and
peft LoRA adapters on a base (``open_source``)."""

from __future__ import annotations

import os
import re

import numpy as np

from research.safetensors_io import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CheckpointError, SafetensorsError,
                                     checkpoint_files, is_adapter_dir, json_object)
from research.safetensors_io import open_checked as _open


class TensorSource:
    """Lazy access to one model's tensors; only headers are read until ``read``
    (one tensor ``pread`` into a fresh array) or ``view`` (one tensor mapped from
    the page cache; see ``research.safetensors_io``)."""

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
        from research.training.checkpoint import Checkpointer, CheckpointMismatch

        ck_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else os.path.dirname(path)
        ck = Checkpointer(ck_dir, save_every=0, keep=1, async_save=False)
        try:
            step = ck.latest() if not _is_orbax_step(path) else int(os.path.basename(path))
            if step is None:
                raise CheckpointError(f"{path}: an orbax directory without checkpoints")
            here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            meta = ck.param_metadata(step)
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), meta)
            params = ck.restore_params(step, target)
        except CheckpointMismatch as e:
            raise CheckpointError(str(e)) from None
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

    def read(self, name: str, rows: tuple[int, int] | None = None, *, flat: bool = False) -> np.ndarray:
        """One tensor, or its leading-axis slice ``rows = (start, stop)`` (with ``flat``,
        rows of its ``[-1, shape[-1]]`` view)."""
        return self._get(name, rows, "read", flat)

    def view(self, name: str, rows: tuple[int, int] | None = None, *, flat: bool = False) -> np.ndarray:
        """``read``'s tensor mapped from the page cache where it can be, else read
        (``SafetensorsFile.view``): a writable copy-on-write array."""
        return self._get(name, rows, "view", flat)

    def columns(self, name: str, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        """Columns ``cols = (start, stop)`` of rows ``rows`` of tensor ``name``'s ``[-1,
        shape[-1]]`` view, read apart from the rest of the rows (``SafetensorsFile.columns``)."""
        if self._arrays is not None:
            return np.array(self._get(name, rows, "read", flat=True)[:, cols[0]:cols[1]])
        fp = self._files[name]
        try:
            return self._handle(fp).columns(name, rows, cols)
        except (SafetensorsError, OSError) as e:
            raise CheckpointError(f"{fp}: cannot read tensor {name} ({e})") from None

    def _get(self, name, rows, how: str, flat: bool = False) -> np.ndarray:
        if self._arrays is not None:
            a = self._arrays[name]
            a = a.reshape(-1, a.shape[-1]) if flat and a.ndim else a
            return a if rows is None else a[rows[0]:rows[1]]
        fp = self._files[name]
        try:
            return getattr(self._handle(fp), how)(name, rows, flat=flat)
        except (SafetensorsError, OSError) as e:
            raise CheckpointError(f"{fp}: cannot read tensor {name} ({e})") from None

    def config_json(self) -> str | None:
        d = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
        p = os.path.join(d, "config.json")
        return p if os.path.isfile(p) else None


def open_source(path: str):
    """A ``TensorSource``, or an ``AdapterSource`` for a peft LoRA adapter: written
    ``BASE+ADAPTER`` (mergekit's syntax), or an adapter directory alone when its
    ``base_model_name_or_path`` is a local directory."""
    if not os.path.exists(path) and "+" in path:
        base, adapter = path.rsplit("+", 1)
        if not is_adapter_dir(adapter):
            raise CheckpointError(f"{path}: {adapter} is not a peft adapter directory (no {ADAPTER_CONFIG})")
        return AdapterSource(TensorSource(base), adapter)
    if os.path.isdir(path) and is_adapter_dir(path):
        from research.models import lora

        _, raw = lora.read_peft_config(path)
        base = raw.get("base_model_name_or_path")
        if not base or not os.path.isdir(base):
            raise CheckpointError(f"{path}: a LoRA adapter whose base_model_name_or_path ({base!r}) is not a local "
                                  f"directory; name its base as BASE+ADAPTER, e.g. model: path/to/base+{path}")
        return AdapterSource(TensorSource(base), path)
    return TensorSource(path)


_LORA_A = re.compile(r"^base_model\.model\.(.+)\.lora_A(?:\.[^.]+)?\.weight$")


class AdapterSource:
    """A base model with a peft LoRA adapter folded in, tensor by tensor: an
    adapted weight ``[out, in]`` reads as ``W + s * B @ A`` (float32 sum, rounded
    once to ``W``'s dtype); a row block reads ``B``'s rows of it.  Every other
    tensor is the base's."""

    def __init__(self, base: TensorSource, adapter: str):
        from research.models import lora

        cfg, _ = lora.read_peft_config(adapter)
        file = os.path.join(adapter, ADAPTER_WEIGHTS)
        if not os.path.isfile(file):
            raise CheckpointError(f"{adapter}: {ADAPTER_WEIGHTS} is missing")
        f = _open(file)
        try:
            tensors = {n: f.read(n) for n in f.keys()}
        finally:
            f.close()
        self.base, self.path, self.scale = base, f"{base.path}+{adapter}", cfg.scale
        self.shapes, self.dtypes = base.shapes, base.dtypes
        self._factors = {}
        for name_a in sorted(tensors):
            m = _LORA_A.match(name_a)
            if not m:
                if ".lora_B" not in name_a:
                    raise CheckpointError(f"{file}: tensor {name_a} is not a LoRA factor (only lora_A/lora_B)")
                if name_a.replace(".lora_B", ".lora_A") not in tensors:
                    raise CheckpointError(f"{file}: tensor {name_a.replace('.lora_B', '.lora_A')} is missing "
                                          "(its lora_B is there)")
                continue
            name_b = name_a.replace(".lora_A", ".lora_B")
            target = f"{m.group(1)}.weight"
            if name_b not in tensors:
                raise CheckpointError(f"{file}: tensor {name_b} is missing (its lora_A is there)")
            if target not in base.shapes:
                raise CheckpointError(f"{file}: tensor {name_a} adapts {target}, which {base.path} does not hold")
            if len(base.shapes[target]) != 2:
                raise CheckpointError(f"{file}: tensor {name_a} adapts {target} of shape {base.shapes[target]}; "
                                      "LoRA adapts matrices")
            a, b = tensors[name_a].astype(np.float32), tensors[name_b].astype(np.float32)
            out, inp = base.shapes[target]
            if a.shape != (cfg.rank, inp) or b.shape != (out, cfg.rank):
                raise CheckpointError(f"{file}: {name_a} {a.shape} and {name_b} {b.shape} do not fit {target} "
                                      f"{(out, inp)} at r={cfg.rank}")
            self._factors[target] = (a, b)

    @property
    def names(self) -> list[str]:
        return self.base.names

    def nbytes(self, name: str) -> int:
        return self.base.nbytes(name)

    def read(self, name: str, rows: tuple[int, int] | None = None, *, flat: bool = False) -> np.ndarray:
        return self._get(name, rows, "read", flat)

    def view(self, name: str, rows: tuple[int, int] | None = None, *, flat: bool = False) -> np.ndarray:
        return self._get(name, rows, "view", flat)

    def columns(self, name: str, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        return self._adapted(name, self.base.columns(name, rows, cols), rows, cols)

    def _get(self, name, rows, how: str, flat: bool) -> np.ndarray:
        return self._adapted(name, getattr(self.base, how)(name, rows, flat=flat), rows)

    def _adapted(self, name, w, rows, cols=None) -> np.ndarray:
        """``w``, rows ``rows`` (and columns ``cols``) of the base's tensor ``name``, with
        the adapter's ``s * B @ A`` added where it adapts that tensor."""
        if name not in self._factors:  # adapted tensors are matrices: their flat rows are their rows
            return w
        a, b = self._factors[name]
        b = b if rows is None else b[rows[0]:rows[1]]
        a = a if cols is None else a[:, cols[0]:cols[1]]
        return (w.astype(np.float32) + self.scale * (b @ a)).astype(w.dtype)

    def config_json(self) -> str | None:
        return self.base.config_json()


class NameMap:
    """An input read through a name table: each of its tensors ``name`` is
    ``table[name] = (source, that source's name)``, with a ``TensorSource``'s
    interface.  A slices merge's input positions (``slices.py``) and tied heads
    (``untie_head``) are these."""

    def __init__(self, table: dict):
        self.table = table
        self.shapes = {out: src.shapes[n] for out, (src, n) in table.items()}
        self.dtypes = {out: src.dtypes[n] for out, (src, n) in table.items()}
        self.origins = list(dict.fromkeys(src for src, _ in table.values()))  # distinct sources, first first
        self.path = ", ".join(dict.fromkeys(o.path for o in self.origins))

    @property
    def names(self) -> list[str]:
        return list(self.table)

    def nbytes(self, name: str) -> int:
        src, n = self.table[name]
        return src.nbytes(n)

    def read(self, name: str, rows: tuple[int, int] | None = None, *, flat: bool = False) -> np.ndarray:
        src, n = self.table[name]
        return src.read(n, rows, flat=flat)

    def view(self, name: str, rows: tuple[int, int] | None = None, *, flat: bool = False) -> np.ndarray:
        src, n = self.table[name]
        return src.view(n, rows, flat=flat)

    def columns(self, name: str, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        src, n = self.table[name]
        return src.columns(n, rows, cols)

    def config_json(self) -> str | None:
        return self.origins[0].config_json()


def origins(src) -> list:
    """The checkpoints an input reads: a ``NameMap``'s sources, else the input itself."""
    return getattr(src, "origins", [src])


HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


def untie_head(sources: dict) -> dict:
    """``{path: source}`` with tied heads made explicit where some inputs have an
    ``lm_head.weight`` and others, whose embeddings are tied to it, do not: those
    read it as their ``model.embed_tokens.weight``, the matrix their logits are
    computed with.  Inputs are left as they are where none or all have one."""
    with_head = [s for s in sources.values() if HEAD in s.shapes]
    if not with_head or len(with_head) == len(sources):
        return sources
    return {p: NameMap({**{n: (s, n) for n in s.names}, HEAD: (s, EMBED)}) if _tied(s) else s
            for p, s in sources.items()}


def _tied(src) -> bool:
    """Whether ``src`` has no head of its own: its config.json says its embeddings are tied."""
    cj = src.config_json()
    if HEAD in src.shapes or EMBED not in src.shapes or not cj:
        return False
    return json_object(cj).get("tie_word_embeddings") is True


def _is_orbax_step(path: str) -> bool:
    return os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state"))
