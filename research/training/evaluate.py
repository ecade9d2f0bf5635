"""Per-task evaluation: exact match of greedy generations (KV-cached) and loss on held-out splits."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from research.data import packing, tasks as tasks_lib
from research.distributed import to_host
from research.models.decoding import greedy
from research.training.step import make_eval_loss


@functools.lru_cache(maxsize=8)
def _eval_loss(graphdef, n_tasks):
    return make_eval_loss(graphdef, n_tasks)


def evaluate(graphdef, params, task_names, tokenizer, *, samples: int = 32, max_new_tokens: int = 32,
             seq_len: int = 256, split: str = "val", offset: int = 0) -> dict:
    """``{task: {"accuracy": exact-match rate, "loss": mean token loss}}`` on examples
    ``offset .. offset + samples`` of ``split``.

    ``task_names`` holds names or task objects.  A task that is not
    generative (``text``) gets ``"accuracy": None``: only its loss is taken.

    Generation stops after ``max_new_tokens`` or one token past the longest
    reference response of the task's examples, whichever is first: a correct
    answer must end with EOS inside that budget.
    """
    out = {}
    gen = functools.partial(greedy, graphdef)
    eval_loss = _eval_loss(graphdef, len(task_names))
    for t_id, name in enumerate(task_names):
        task = tasks_lib.make_task(name) if isinstance(name, str) else name
        examples = [task.example(split, offset + i) for i in range(samples)]
        name = name if isinstance(name, str) else name.name
        out[name] = {"accuracy": _exact_match(gen, params, examples, tokenizer, max_new_tokens, seq_len)
                     if getattr(task, "generative", True) else None}
        batch = packing.pack([tasks_lib.encode(p, r, tokenizer, task_id=t_id) for p, r in examples], seq_len, "bfd",
                             eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        rows = batch["tokens"].shape[0]
        extra = -rows % 4  # pad with empty rows: fewer distinct shapes to compile
        fields = {k: jnp.asarray(np.pad(batch[k], ((0, extra), (0, 0)), constant_values=-1 if k == "task_ids" else 0))
                  for k in ("tokens", "segment_ids", "positions", "targets", "loss_weights", "task_ids")}
        loss, aux = eval_loss(params, fields)
        out[name]["loss"] = float(to_host(loss))
    return out


def _exact_match(gen, params, examples, tokenizer, max_new_tokens, seq_len):
    """The fraction of ``examples`` whose greedy continuation is the reference."""
    samples = len(examples)
    prompts = [tokenizer.encode(p) for p, _ in examples]
    longest = max(len(p) for p in prompts)
    max_new = min(max_new_tokens, max(len(tokenizer.encode(r)) for _, r in examples) + 1)
    width = min(seq_len, -(-(longest + max_new) // 16) * 16)  # few distinct shapes to compile
    toks = np.full((samples, width), tokenizer.pad_id, np.int32)
    for i, p in enumerate(prompts):
        toks[i, : len(p)] = p[:width]
    lengths = np.array([min(len(p), width - 1) for p in prompts], np.int32)
    done = np.asarray(to_host(gen(params, jnp.asarray(toks), jnp.asarray(lengths), max_new)))
    correct = 0
    for i, (_, response) in enumerate(examples):
        new = done[i, lengths[i] :].tolist()
        if tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
        correct += tasks_lib.exact_match(tokenizer.decode(new), response)
    return correct / samples
