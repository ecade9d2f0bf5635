"""A tiny multi-task run for smoke tests (~20 s on a 2-core CPU).

    python -m research.train --config experiments/configs/tiny.py

Expected: the loss falls from ~5.6 (uniform over 259 bytes) to ~4.3 in 30
steps; exact-match accuracy stays near 0 (far too few steps), the run
writes runs/tiny/{checkpoints,logs/metrics.csv}.
"""

from research.training import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model="tiny",
        tasks=("copy", "reverse", "g2p"),
        seq_len=128,
        batch_size=4,
        chunk_size=32,
        steps=30,
        lr=3e-3,
        warmup_steps=5,
        save_every=10,
        log_every=5,
        eval_samples=8,
        max_new_tokens=16,
        neftune_alpha=5.0,
    )
