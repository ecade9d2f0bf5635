"""Text generation from a model: batched prompts, a fixed-size KV cache, greedy or sampled.

    from research import generate
    outs = generate(model, ["copy: abc\\n", "reverse: hello\\n"], max_new_tokens=16, tokenizer=tok)
    outs = generate(model, prompts, 64, tokenizer=tok, temperature=0.8, top_p=0.95,
                    key=jax.random.key(0), stop=["\\n\\n"])

``prompts`` are strings (encoded with ``tokenizer``, BOS first where it adds
one) or lists of token ids; the result is the list of continuations in the
same form, without the stop token or stop string that ended each one.  All
rows share one cache of ``cache_size`` slots (default: the longest prompt
plus ``max_new_tokens``, rounded up to a multiple of 64 so that few shapes
compile), in one jitted program (``research.models.decoding.sample``).

Stopping: a row stops at EOS (unless ``stop_at_eos=False``), at any token id
in ``stop``, or at any stop string of ``stop``.  A stop string that is a single token stops the row on
the device; a longer one is found in the decoded text, which is cut there
(the row may have run on to ``max_new_tokens``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.data.tokenizers import ByteTokenizer, encode_sequence
from research.models.decoding import sample


def generate(model, prompts: Sequence, max_new_tokens: int = 64, *, tokenizer=None, temperature: float = 0.0,
             top_p: float = 1.0, stop: Sequence = (), key=None, cache_size: int | None = None,
             stop_at_eos: bool = True) -> list:
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise ValueError(f"generate: need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1; got "
                         f"{temperature}, {top_p}, {max_new_tokens}")
    if temperature > 0 and key is None:
        raise ValueError("generate: sampling (temperature > 0) needs an explicit key=jax.random.key(...)")
    if not prompts:
        return []
    as_text = isinstance(prompts[0], str)
    tok = tokenizer or ByteTokenizer()
    if as_text and tokenizer is None and model.cfg.vocab_size != ByteTokenizer.vocab_size:
        raise ValueError("generate: string prompts need tokenizer= (the model's vocabulary is not the byte one)")
    ids = [encode_sequence(tok, p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    if any(not p for p in ids):
        raise ValueError("generate: an empty prompt (give at least one token, e.g. BOS)")
    stop_ids, stop_strings = ({tok.eos_id} if stop_at_eos else set()), []
    for s in stop:
        if isinstance(s, (int, np.integer)):
            stop_ids.add(int(s))
        else:
            one = tok.encode(s)
            stop_ids.add(one[0]) if len(one) == 1 else stop_strings.append(s)
    longest = max(len(p) for p in ids)
    W = cache_size or -(-(longest + max_new_tokens) // 64) * 64
    if longest >= W:
        raise ValueError(f"generate: cache_size={W} leaves no room after the longest prompt ({longest} tokens)")
    if W > model.cfg.max_position:
        W = max(longest + 1, model.cfg.max_position)
    toks = np.full((len(ids), W), tok.pad_id, np.int32)
    for i, p in enumerate(ids):
        toks[i, : len(p)] = p
    lengths = np.array([len(p) for p in ids], np.int32)
    graphdef, params = nnx.split(model)
    out, n_new = sample(graphdef, params, jnp.asarray(toks), jnp.asarray(lengths),
                        key if key is not None else jax.random.key(0), max_new=int(max_new_tokens),
                        temperature=float(temperature), top_p=float(top_p), stop_ids=tuple(sorted(stop_ids)))
    out, n_new = np.asarray(out), np.asarray(n_new)
    results = []
    for i, p in enumerate(ids):
        new = out[i, len(p) : len(p) + n_new[i]].tolist()
        if new and new[-1] in stop_ids:
            new = new[:-1]
        if not as_text:
            results.append(new)
            continue
        text = tok.decode(new)
        cuts = [text.find(s) for s in stop_strings if s in text]
        results.append(text[: min(cuts)] if cuts else text)
    return results
