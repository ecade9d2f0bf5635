"""The embedded experiment suite: a general base, then one expert per target task.

The regime of the task-arithmetic (Ilharco et al. 2023) and TIES (Yadav et
al. 2023) papers: a pre-trained model that is general but weak on each
target, and fine-tunes that each become an expert on one target.

* **Pretraining** is generic and disjoint from the targets: byte-level
  language modelling on English prose (``text``) plus six string operations
  in the ``"<name>: <input>\\n" -> <output><EOS>`` format (``FORMAT_TASKS``:
  copy, a shift by one, a right rotation, repetition, every other letter,
  a capitalised first letter).  They give the base the primitives the
  targets are built from (per-letter maps, re-orderings, duplication), so
  the base is general over letter strings, but none of them is a target,
  and no target's prompt prefix ever appears in pretraining.
* **Experts** fine-tune on their target mixed with a replay of the format
  tasks (``REPLAY`` of the batch).  An expert trained on its target alone
  applies its operation to every prompt, whatever the prefix says, and such
  task vectors cannot be merged; with the replay, it learns the target *as
  a new instruction* and keeps the others.  The (tied) embedding is frozen
  while fine-tuning, as Ilharco et al. freeze the classification head.
* **Target candidates** are algorithmic tasks over the same short letter
  strings that the format tasks use.  A candidate becomes a
  target only if it passes the gates below; one that fails is reported, not
  merged.
* **Gates** (checked on the validation split): the base scores at most
  ``BASE_MAX`` exact match on the task, and its expert at least
  ``EXPERT_MIN`` and at least ``MARGIN`` above the base.

Splits are disjoint by construction (``research.data.tasks``).
"""

from __future__ import annotations

import dataclasses

FORMAT_TASKS = ("copy", "rot1", "rotr", "repeat", "skip", "capfirst")
PRETRAIN_MIXTURE = (("text", 0.4), *((t, 0.1) for t in FORMAT_TASKS))
REPLAY = 0.5  # the share of an expert's (and the multitask model's) batch that replays FORMAT_TASKS
FINETUNE_FREEZE = ("embedding",)
CANDIDATES = ("reverse", "sort", "cipher", "swap", "upper", "rotl", "double")
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
