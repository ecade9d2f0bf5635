"""The embedded experiment suite: a general base, then one expert per target task.

The regime of the task-arithmetic (Ilharco et al. 2023) and TIES (Yadav et al.
2023) papers: a pre-trained model that is general but weak on each target,
and fine-tunes that each become an expert on one target.

* **The base** is pretrained once on generic data disjoint from the targets:
  byte-level language modelling on English prose (``text``) plus six string
  operations in the ``"<name>: <input>\\n" -> <output><EOS>`` format
  (``FORMAT_TASKS``: copy, a shift by one, a right rotation, repetition, every
  other letter, a capitalised first letter), until it solves those format
  tasks (``experiments/pretrain_base.py``; the result is committed as
  ``experiments/suite_base``, as the papers start from a published
  checkpoint).  No target's prompt prefix ever appears in pretraining.
* **Targets** (``CANDIDATES``) answer with one letter: a read of one position
  (``first``, ``second``, ``last``), of the whole string (``max``, ``min``),
  or a letter map of one position (``succ``).  They are classification
  problems over 26 letters, as the papers' benchmarks are classification
  problems.  Always giving the most frequent answer scores below the base's
  gate (``majority_rate``: 6-7% for the position reads, 15-18% for ``min``'s
  "a" and ``max``'s "z"); the demo reports it beside the table.  ``GENERATION_CANDIDATES``
  (reverse, sort, a rotation cipher, ...) answer with a whole string; they
  are the generation ablation of the suite.
* **Experts** fine-tune on their target mixed with a replay of the format
  tasks (``REPLAY`` of the batch).  An expert trained on its target alone
  applies its operation to every prompt, whatever the prefix says, and such
  task vectors cannot be merged; with the replay, it learns the target *as
  a new instruction* and keeps the others.  The (tied) embedding is frozen
  while fine-tuning, as Ilharco et al. freeze the classification head.
* **Gates** (checked on the validation split): the base scores at most
  ``BASE_MAX`` exact match on the task, and its expert at least
  ``EXPERT_MIN`` and at least ``MARGIN`` above the base.  A candidate that
  fails is reported, not merged.

Splits are disjoint by construction (``research.data.tasks``).
"""

from __future__ import annotations

import collections
import dataclasses

FORMAT_TASKS = ("copy", "rot1", "rotr", "repeat", "skip", "capfirst")
PRETRAIN_MIXTURE = (("text", 0.4), *((t, 0.1) for t in FORMAT_TASKS))
REPLAY = 0.5  # the share of an expert's (and the multitask model's) batch that replays FORMAT_TASKS
FINETUNE_FREEZE = ("embedding",)
CANDIDATES = ("first", "second", "last", "max", "min", "succ")
GENERATION_CANDIDATES = ("reverse", "sort", "cipher", "swap", "upper", "rotl", "double")
INPUT_LENGTH = (3, 6)  # characters of the letter strings; add: up to 3-digit numbers


@dataclasses.dataclass(frozen=True)
class Gates:
    base_max: float = 0.20
    expert_min: float = 0.70
    margin: float = 0.50

    def check(self, base_acc: float, expert_acc: float) -> dict:
        """Each gate with its measured values and verdict (accuracies are fractions k/n,
        so a boundary value passes: 0.7 - 0.2 >= 0.5 up to rounding)."""
        eps = 1e-9
        return {
            "base_at_most": {"threshold": self.base_max, "value": base_acc, "passed": base_acc <= self.base_max + eps},
            "expert_at_least": {"threshold": self.expert_min, "value": expert_acc, "passed": expert_acc >= self.expert_min - eps},
            "margin_at_least": {"threshold": self.margin, "value": expert_acc - base_acc,
                                "passed": expert_acc - base_acc >= self.margin - eps},
        }


def finetune_mixture(targets, replay: float = REPLAY) -> dict:
    """Mixture weights of a fine-tune: the targets share ``1 - replay`` equally, the
    format tasks share ``replay`` equally."""
    if not 0 <= replay < 1:
        raise ValueError(f"replay must be in [0, 1), got {replay}")
    mix = {t: (1 - replay) / len(targets) for t in targets}
    if replay:
        mix.update({t: replay / len(FORMAT_TASKS) for t in FORMAT_TASKS})
    return mix


def task_lengths(names) -> tuple:
    """``TrainConfig.task_lengths`` for the suite's generated tasks."""
    return tuple((t, *INPUT_LENGTH) for t in names if t != "text")


def majority_rate(task, split: str = "test", n: int = 200) -> float:
    """The share of the first ``n`` examples of ``split`` whose response is the most
    frequent one: the exact match of a model that always gives that answer."""
    counts = collections.Counter(task.example(split, i)[1] for i in range(n))
    return counts.most_common(1)[0][1] / n
