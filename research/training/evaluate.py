"""Per-source evaluation: exact match of greedy generations (KV-cached), loss and
perplexity on held-out splits."""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from research.data import packing, tasks as tasks_lib
from research.data.tokenizers import encode_sequence
from research.distributed import to_host
from research.models.decoding import greedy
from research.training.step import make_eval_loss


@functools.lru_cache(maxsize=8)
def _eval_loss(graphdef):
    """One loss program per model, whatever the sources: each source's batch is
    scored alone (task id 0), so only the overall mean is read."""
    return make_eval_loss(graphdef, 1)


def evaluate(graphdef, params, task_names, tokenizer, *, samples: int = 32, max_new_tokens: int = 32,
             seq_len: int = 256, split: str = "val", offset: int = 0) -> dict:
    """``{source: {"accuracy": exact-match rate, "loss": mean token loss, "perplexity":
    exp(loss), "samples": n}}`` on examples ``offset .. offset + n`` of ``split``,
    ``n = samples`` or fewer when the source's split is smaller.

    ``task_names`` holds task names or sources (``research.data.sources``).
    A source that is not generative (``text``, text-only JSONL) gets
    ``"accuracy": None``: only its loss is taken.  A source with no examples
    in ``split`` gets ``None`` everywhere and ``"samples": 0``.

    Generation stops after ``max_new_tokens`` or one token past the longest
    reference response of the task's examples, whichever is first: a correct
    answer must end with EOS inside that budget.
    """
    out = {}
    gen = functools.partial(greedy, graphdef)
    eval_loss = _eval_loss(graphdef)
    for name in task_names:
        task = tasks_lib.make_task(name) if isinstance(name, str) else name
        name = name if isinstance(name, str) else name.name
        size = task.size[split] if task.size else None
        n = samples if size is None else max(0, min(samples, size - offset))
        if n == 0:
            out[name] = {"accuracy": None, "loss": None, "perplexity": None, "samples": 0}
            continue
        examples = [task.example(split, offset + i) for i in range(n)]
        out[name] = {"accuracy": _exact_match(gen, params, examples, tokenizer, max_new_tokens, seq_len)
                     if getattr(task, "generative", True) else None}
        batch = packing.pack([tasks_lib.encode(p, r, tokenizer) for p, r in examples], seq_len, "bfd",
                             eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        rows = batch["tokens"].shape[0]
        extra = -rows % 4  # pad with empty rows: fewer distinct shapes to compile
        fields = {k: jnp.asarray(np.pad(batch[k], ((0, extra), (0, 0)), constant_values=-1 if k == "task_ids" else 0))
                  for k in ("tokens", "segment_ids", "positions", "targets", "loss_weights", "task_ids")}
        loss, aux = eval_loss(params, fields)
        out[name]["loss"] = float(to_host(loss))
        out[name]["perplexity"] = math.exp(min(out[name]["loss"], 700.0))
        out[name]["samples"] = n
    return out


def _exact_match(gen, params, examples, tokenizer, max_new_tokens, seq_len):
    """The fraction of ``examples`` whose greedy continuation is the reference."""
    samples = len(examples)
    prompts = [encode_sequence(tokenizer, p) for p, _ in examples]
    longest = max(len(p) for p in prompts)
    max_new = min(max_new_tokens, max(len(tokenizer.encode(r)) for _, r in examples) + 1)
    width = min(seq_len, -(-(longest + max_new) // 16) * 16)  # few distinct shapes to compile
    toks = np.full((samples, width), tokenizer.pad_id, np.int32)
    for i, p in enumerate(prompts):
        toks[i, : len(p)] = p[:width]
    lengths = np.array([min(len(p), width - 1) for p in prompts], np.int32)
    done = np.asarray(to_host(gen(params, jnp.asarray(toks), jnp.asarray(lengths), max_new, (tokenizer.eos_id,))))
    correct = 0
    for i, (_, response) in enumerate(examples):
        new = done[i, lengths[i] :].tolist()
        if tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
        correct += tasks_lib.exact_match(tokenizer.decode(new), response)
    return correct / samples
