"""Fine-tune a Hugging Face checkpoint on your own JSONL file.

    python -m research.train --config experiments/configs/finetune_hf.py --workdir runs/mine \\
        --set init_from=path/to/llama --set data=jsonl:data/mine.jsonl
    python -m research.train ... --set lora_rank=16         # LoRA instead of full fine-tuning

The model comes from ``init_from``'s ``config.json`` and safetensors, the
tokenizer (and chat template, for ``{"messages"}`` lines) from the files
beside them.  The file's records go 90/5/5 to train/val/test by a hash of
their content (``research.data.sources``); val is scored at the end (loss,
perplexity, exact match of greedy generations), test is left for
``python -m research.evaluate RUN --split test``.

Expected, for the random 2-layer Llama of the tests: the loss falls over
the run, and the run writes ``WORKDIR/{checkpoints,logs/metrics.csv}``
(and ``WORKDIR/adapter`` for LoRA).  For a real checkpoint raise
``seq_len``, ``batch_size`` and ``steps`` to your data.
"""

from research.training import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        data=("jsonl:data/train.jsonl",),
        seq_len=128,
        batch_size=8,
        chunk_size=64,
        steps=30,
        lr=3e-4,
        warmup_steps=4,
        weight_decay=0.0,
        save_every=15,
        log_every=10,
        eval_samples=8,
        max_new_tokens=16,
        progress=False,
    )
