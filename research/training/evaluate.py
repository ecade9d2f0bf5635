"""Per-task evaluation: exact match of greedy generations and loss on held-out splits."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.data import packing, tasks as tasks_lib
from research.training.step import make_eval_loss


@functools.lru_cache(maxsize=8)
def _greedy(graphdef):
    @jax.jit
    def run(params, tokens, lengths, max_new):
        """Greedy continuation of left-aligned prompts, all rows at once (no KV cache:
        small models and short answers)."""
        model = nnx.merge(graphdef, params)
        B, T = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(T), (B, T))

        def body(i, toks):
            cur = lengths + i
            seg = (pos < cur[:, None]).astype(jnp.int32)
            logits = model.decode(model.embed(toks), seg, pos)
            nxt = jnp.argmax(logits[jnp.arange(B), cur - 1], -1).astype(toks.dtype)
            return toks.at[jnp.arange(B), jnp.minimum(cur, T - 1)].set(jnp.where(cur < T, nxt, toks[:, -1]))

        return jax.lax.fori_loop(0, max_new, body, tokens)

    return run


@functools.lru_cache(maxsize=8)
def _eval_loss(graphdef, n_tasks):
    return make_eval_loss(graphdef, n_tasks)


def evaluate(graphdef, params, task_names, tokenizer, *, samples: int = 32, max_new_tokens: int = 32,
             seq_len: int = 256, split: str = "eval", offset: int = 0) -> dict:
    """``{task: {"accuracy": exact-match rate, "loss": mean token loss}}`` on examples
    ``offset .. offset + samples`` of ``split``.

    Generation stops after ``max_new_tokens`` or one token past the longest
    reference response of the task's examples, whichever is first: a correct
    answer must end with EOS inside that budget.
    """
    out = {}
    gen = _greedy(graphdef)
    eval_loss = _eval_loss(graphdef, len(task_names))
    for t_id, name in enumerate(task_names):
        task = tasks_lib.make_task(name) if isinstance(name, str) else name
        examples = [task.example(split, offset + i) for i in range(samples)]
        prompts = [tokenizer.encode(p) for p, _ in examples]
        longest = max(len(p) for p in prompts)
        max_new = min(max_new_tokens, max(len(tokenizer.encode(r)) for _, r in examples) + 1)
        width = min(seq_len, -(-(longest + max_new) // 16) * 16)  # few distinct shapes to compile
        toks = np.full((samples, width), tokenizer.pad_id, np.int32)
        for i, p in enumerate(prompts):
            toks[i, : len(p)] = p[:width]
        lengths = np.array([min(len(p), width - 1) for p in prompts], np.int32)
        done = np.asarray(gen(params, jnp.asarray(toks), jnp.asarray(lengths), max_new))
        correct = 0
        for i, (_, response) in enumerate(examples):
            new = done[i, lengths[i] :].tolist()
            if tokenizer.eos_id in new:
                new = new[: new.index(tokenizer.eos_id)]
            correct += tasks_lib.exact_match(tokenizer.decode(new), response)
        batch = packing.pack([tasks_lib.encode(p, r, tokenizer, task_id=t_id) for p, r in examples], seq_len, "bfd",
                             eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        rows = batch["tokens"].shape[0]
        extra = -rows % 4  # pad with empty rows: fewer distinct shapes to compile
        fields = {k: jnp.asarray(np.pad(batch[k], ((0, extra), (0, 0)), constant_values=-1 if k == "task_ids" else 0))
                  for k in ("tokens", "segment_ids", "positions", "targets", "loss_weights", "task_ids")}
        loss, aux = eval_loss(params, fields)
        out[name if isinstance(name, str) else name.name] = {"accuracy": correct / samples, "loss": float(loss)}
    return out
