"""Evaluate a model on held-out data: loss, perplexity and exact match per source.

    python -m research.evaluate out/merged --data jsonl:data/a.jsonl jsonl:data/b.jsonl
    python -m research.evaluate runs/my_run                 # the run's own data and tokenizer

``MODEL`` is an HF directory (``config.json`` + safetensors; its tokenizer
unless ``--tokenizer``) or a training run directory (its latest checkpoint;
its data, tokenizer and templates unless given).  Sources are the specs of
``research.data.sources``; each is scored on its ``--split`` (``val`` by
default: the split the trainer evaluates on, disjoint from training) by
``research.training.evaluate``.  Prints one table row per source and, with
``--json``, writes the results there (atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def _table(results: dict) -> str:
    fmt = lambda v, f: "-" if v is None else format(v, f)
    rows = ["| source | samples | loss | perplexity | exact match |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['samples']} | {fmt(r['loss'], '.4f')} | {fmt(r['perplexity'], '.2f')} | "
                    f"{fmt(r['accuracy'], '.3f')} |")
    return "\n".join(rows)


def evaluate_model(model_dir: str, data=(), *, tokenizer=None, split="val", samples=64, max_new_tokens=64,
                   seq_len=512, prompt_template=None, chat_template=None) -> dict:
    """``research.training.evaluate`` on ``model_dir`` (see the module docstring)."""
    from flax import nnx

    from research.models import from_hf
    from research.training import TrainConfig, run_config
    from research.training import data as data_lib
    from research.training.evaluate import evaluate

    if os.path.isfile(os.path.join(model_dir, "config.json")):
        model = from_hf(model_dir)
        cfg = TrainConfig(init_from=model_dir)
    elif os.path.isfile(os.path.join(model_dir, run_config.FILE)):
        from research.export import load_run

        model, cfg, _ = load_run(model_dir)
    else:
        raise FileNotFoundError(f"{model_dir}: neither an HF directory (config.json) nor a training run "
                                f"({run_config.FILE})")
    changes = {"tokenizer": tokenizer, "prompt_template": prompt_template, "chat_template": chat_template}
    changes = {k: v for k, v in changes.items() if v is not None}
    if data:
        changes.update(data=tuple(data), tasks=TrainConfig.tasks, mixing=TrainConfig.mixing)
    cfg = dataclasses.replace(cfg, **changes)
    if not cfg.data and cfg.init_from == model_dir:
        raise ValueError("--data: name the sources to evaluate an HF directory on")
    tok = data_lib.tokenizer_for(cfg, model.cfg.vocab_size)
    sources, _ = data_lib.sources_for(cfg, tok)
    graphdef, params = nnx.split(model)
    return evaluate(graphdef, params, sources, tok, samples=samples, max_new_tokens=max_new_tokens,
                    seq_len=seq_len, split=split)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m research.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data", nargs="+", default=(), metavar="SPEC", help="sources (default: a run's own)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--samples", type=int, default=64, help="examples per source (fewer if the split is smaller)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--prompt-template", default=None)
    ap.add_argument("--chat-template", default=None)
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    from research.safetensors_io import CheckpointError
    from research.training.config import ConfigError

    try:
        results = evaluate_model(args.model, args.data, tokenizer=args.tokenizer, split=args.split,
                                 samples=args.samples, max_new_tokens=args.max_new_tokens, seq_len=args.seq_len,
                                 prompt_template=args.prompt_template, chat_template=args.chat_template)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_table(results))
    if args.json:
        with open(f"{args.json}.tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(f"{args.json}.tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
