"""grain input pipelines: a task mixture, tokenized, packed, batched; deterministic,
process-count independent, and exactly resumable.

    it = pipeline.make(PipelineConfig(tasks=("copy", "g2p"), seq_len=512, batch_size=8))
    batch = next(it)             # dict of [8, 512] arrays (the packed format): the *global* batch
    state = it.get_state()       # store next to the weights
    it.set_state(state)          # ... and later resume exactly here

Stages: ``grain.MapDataset.range`` over sample indices -> map to (task,
example) through the ``Mixture`` -> tokenize -> pack ``chunk_size``
consecutive samples at a time with best-fit decreasing -> batch rows.  Every
stage is a pure function of the index, so the iterator state is just
``(chunk, row)``: a restored pipeline recomputes its chunk and skips the rows
already served, yielding exactly the batches the uninterrupted one would have.

Multi-process runs.  The global batch at step ``s`` is a pure function of
``(seed, s)`` and this config, never of the number of processes: every
process runs this same iterator, and ``sharding.global_batch`` copies only
that process's rows of it to its devices.  The batches, and the iterator
state in a checkpoint, are therefore the same whether 1 or N processes train,
so a run saved by N processes resumes exactly in M.  The price is that each
process tokenizes and packs the whole global batch (host work that is small
next to a train step for the embedded tasks and byte tokenizer; it grows with
the global batch for an expensive tokenizer).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from research.data import packing, tasks as tasks_lib, tokenizers
from research.data.sources import Source, open_source
from research.data.mixture import Mixture

BATCH_FIELDS = ("tokens", "segment_ids", "positions", "targets", "loss_weights", "task_ids")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    tasks: tuple[str, ...] = ("copy", "reverse", "sort", "add", "cipher", "g2p", "p2g")
    split: str = "train"
    seq_len: int = 512
    batch_size: int = 8
    mixing: Any = "temperature"  # "size", "temperature" or {task: weight}
    temperature: float = 2.0
    seed: int = 0
    chunk_size: int = 256  # samples packed together (the look-ahead)
    strategy: str = "bfd"
    overlong: str = "split"
    task_lengths: tuple = ()  # ((task, min_len, max_len), ...) for generated tasks
    tokenizer: str | None = None  # "byte", a .model or a tokenizer.json


def tasks_of(names: Sequence[str], task_lengths: Sequence = ()) -> list:
    """Task objects for ``names``, with ``((task, min_len, max_len), ...)`` applied."""
    lengths = {t: (a, b) for t, a, b in task_lengths}
    return [open_source(n, task_lengths=lengths) for n in names]


class _PackedBatches(grain.DatasetIterator):
    def __init__(self, samples: grain.MapDataset, cfg: PipelineConfig, pad_id: int, eos_id: int):
        super().__init__()
        self._samples, self._cfg, self._pad, self._eos = samples, cfg, pad_id, eos_id
        self._chunk, self._row = 0, 0
        self._rows: dict | None = None

    def _load(self):
        k = self._cfg.chunk_size
        chunk = [self._samples[self._chunk * k + j] for j in range(k)]
        batch = packing.pack(chunk, self._cfg.seq_len, self._cfg.strategy, eos_id=self._eos,
                             overlong=self._cfg.overlong, pad_id=self._pad)
        self._rows = {f: batch[f] for f in BATCH_FIELDS}

    def __next__(self) -> dict:
        out = {f: [] for f in BATCH_FIELDS}
        need = self._cfg.batch_size
        while need:
            if self._rows is None:
                self._load()
            n_rows = self._rows["tokens"].shape[0]
            take = min(need, n_rows - self._row)
            for f in BATCH_FIELDS:
                out[f].append(self._rows[f][self._row : self._row + take])
            self._row += take
            need -= take
            if self._row == n_rows:
                self._chunk, self._row, self._rows = self._chunk + 1, 0, None
        return {f: np.concatenate(v) for f, v in out.items()}

    def get_state(self) -> dict:
        return {"chunk": self._chunk, "row": self._row}

    def set_state(self, state: dict) -> None:
        self._chunk, self._row, self._rows = int(state["chunk"]), int(state["row"]), None


class PackedBatchDataset(grain.IterDataset):
    """Packs consecutive ``chunk_size`` samples of a MapDataset into batches."""

    def __init__(self, samples: grain.MapDataset, cfg: PipelineConfig, pad_id: int, eos_id: int):
        super().__init__(samples)
        self._samples, self._cfg, self._ids = samples, cfg, (pad_id, eos_id)

    def __iter__(self) -> _PackedBatches:
        return _PackedBatches(self._samples, self._cfg, *self._ids)


def sample_dataset(cfg: PipelineConfig, sources: Sequence[Source] | None = None, *, tokenizer=None) -> grain.MapDataset:
    """The tokenized, mixed sample stream (before packing) of ``cfg.split``.

    ``sources`` (``research.data.sources.Source``) default to ``cfg.tasks``;
    ``cfg.mixing`` weights them by name."""
    sources = list(sources) if sources is not None else tasks_of(cfg.tasks, cfg.task_lengths)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"data sources need distinct names, got {names}; rename one (jsonl:PATH?name=...)")
    tok = tokenizer or tokenizers.load(cfg.tokenizer)
    mix = Mixture({s.name: (s.size[cfg.split] if s.size else None) for s in sources}, cfg.mixing,
                  temperature=cfg.temperature, seed=cfg.seed)

    def to_sample(i):
        t, j = mix[i]
        prompt, response = sources[t].example(cfg.split, j)
        return tasks_lib.encode(prompt, response, tok, task_id=t)

    return grain.MapDataset.range(0, 1 << 40).map(to_sample)


def make(cfg: PipelineConfig, sources: Sequence[Source] | None = None, *, tokenizer=None) -> _PackedBatches:
    """An iterator of global packed batches (``[batch_size, seq_len]`` per field)."""
    tok = tokenizer or tokenizers.load(cfg.tokenizer)
    samples = sample_dataset(cfg, sources, tokenizer=tok)
    return iter(PackedBatchDataset(samples, cfg, tok.pad_id, tok.eos_id))
