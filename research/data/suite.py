"""The embedded experiment suite: a general base, then one expert per target task.

The regime of the task-arithmetic (Ilharco et al. 2023) and TIES (Yadav et
al. 2023) papers: a pre-trained model that is general but weak on each
target, and fine-tunes that each become an expert on one target.

* **Pretraining** is generic and disjoint from the targets: byte-level
  language modelling on English prose (``text``) plus ``copy``, a format
  task that teaches ``"<name>: <input>\\n" -> <output><EOS>`` without being a
  target.  No target's prompt prefix ever appears in pretraining.
* **Target candidates** are algorithmic tasks over the same short letter
  strings (or digits) the base has only ever copied.  A candidate becomes a
  target only if it passes the gates below; one that fails is reported, not
  merged.
* **Gates** (checked on the validation split): the base scores at most
  ``BASE_MAX`` exact match on the task, and its expert at least
  ``EXPERT_MIN`` and at least ``MARGIN`` above the base.

Splits are disjoint by construction (``research.data.tasks``).
"""

from __future__ import annotations

import dataclasses

PRETRAIN_MIXTURE = (("text", 0.5), ("copy", 0.5))
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


def task_lengths(names) -> tuple:
    """``TrainConfig.task_lengths`` for the suite's generated tasks."""
    return tuple((t, *INPUT_LENGTH) for t in names if t != "text")
