"""Generated tokens per second: ``research.generate`` (KV cache) against recomputing
the whole prefix for every new token, and against transformers' ``generate``
on the same weights when PyTorch and transformers are installed.

    python experiments/bench_generate.py --docs        # docs/performance.md (~3 min on a 2-core CPU)
    python experiments/bench_generate.py --preset tiny --batch 2 --prompt 8 --new 8 --rounds 1   # smoke

``--batch`` prompts of ``--prompt`` +- 50% tokens (random ids), ``--new``
greedy tokens each (EOS does not stop a row: every row makes all of them), on the
``--preset`` model with random weights:

* **ours**: ``research.generate``: one prefill, then one single-token step per
  new token against a fixed-size cache, all in one jitted program.
* **recompute**: the same greedy tokens from a jitted forward over the whole
  (fixed-width) row for every new token: the cost without a cache.
* **transformers**: ``LlamaForCausalLM.generate(do_sample=False)`` on the
  same weights (exported with ``save_hf``), left-padded, float32, with its
  default dynamic KV cache, when installed; this project does not depend on
  PyTorch, so it is skipped otherwise (the figures in docs/performance.md
  come from a side virtualenv holding torch and transformers on top of the
  project's packages).  Its tokens are compared with ours (an independent
  implementation of the same greedy decoding).

Rows count ``batch * new`` tokens; each figure is the best of ``--rounds``
timed runs after one warm-up (compilation excluded).  The bench checks that
the three decoders produce the same tokens (up to float rounding of the
attention sums, which could part two rows at a near-tie of the argmax).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from research.models import Transformer, preset, save_hf  # noqa: E402
from research.generation import generate  # noqa: E402


def prompts(batch, length, vocab, seed=0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(max(1, length // 2), length + length // 2 + 1, size=batch)
    return [rng.integers(3, vocab, size=int(n)).tolist() for n in lens]




def make_recompute(forward, lengths, new, B, W):
    """Greedy without a cache: the full row through the model for every token."""
    rows = jnp.arange(B)

    @jax.jit
    def run(params, toks):
        def step(i, toks):
            cur = lengths + i
            seg = (jnp.arange(W)[None] < cur[:, None]).astype(jnp.int32)
            logits = forward(params, toks, seg)
            nxt = jnp.argmax(logits[rows, cur - 1], -1).astype(toks.dtype)
            return toks.at[rows, cur].set(nxt)

        return jax.lax.fori_loop(0, new, step, toks)

    return run


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def timed(fn, rounds):
    fn()  # compile and warm up
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best, out


def transformers_tps(model, ids, new, rounds):
    try:
        import torch
        from transformers import LlamaForCausalLM
    except ImportError:
        return None, "not installed here (the project has no PyTorch dependency)", None
    with tempfile.TemporaryDirectory() as d:
        save_hf(model, os.path.join(d, "m"))
        hf = LlamaForCausalLM.from_pretrained(os.path.join(d, "m"), dtype=torch.float32).eval()
    W = max(len(p) for p in ids)
    inp = torch.tensor([[0] * (W - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (W - len(p)) + [1] * len(p) for p in ids])
    run = lambda: hf.generate(input_ids=inp, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = run()
        best = min(_wall(run) for _ in range(rounds))
    new_tokens = [row[W:].tolist() for row in out]
    return len(ids) * new / best, f"torch {torch.__version__}, {torch.get_num_threads()} threads", new_tokens


def _wall(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64, help="mean prompt length (tokens)")
    ap.add_argument("--new", type=int, default=128, help="new tokens per prompt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--docs", action="store_true", help="also write the output into docs/performance.md")
    args = ap.parse_args(argv)
    import perfdoc

    with perfdoc.recorded(args.docs, "generate", "Generation (`experiments/bench_generate.py`)",
                          "experiments/bench_generate.py", argv):
        run(args)


def run(args):
    over = {"n_layers": args.layers} if args.layers else {}
    cfg = preset(args.preset, **over)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    ids = prompts(args.batch, args.prompt, cfg.vocab_size)
    W = -(-(max(map(len, ids)) + args.new) // 64) * 64
    toks = np.zeros((len(ids), W), np.int32)
    for i, p in enumerate(ids):
        toks[i, : len(p)] = p
    toks, lengths = jnp.asarray(toks), jnp.asarray([len(p) for p in ids], jnp.int32)
    forward = lambda p, t, seg: nnx.merge(graphdef, p).decode(
        nnx.merge(graphdef, p).embed(t), seg, jnp.broadcast_to(jnp.arange(W), t.shape))
    n = args.batch * args.new
    t_ours, out_ours = timed(lambda: generate(model, ids, args.new, stop_at_eos=False), args.rounds)
    recompute = make_recompute(forward, lengths, args.new, *toks.shape)
    t_rec, out_rec = timed(lambda: recompute(params, toks), args.rounds)
    out_rec = np.asarray(out_rec)
    agree = [_common_prefix(a, out_rec[i, len(p) : len(p) + args.new].tolist()) for i, (a, p) in enumerate(zip(out_ours, ids))]
    hf_tps, hf_note, hf_out = transformers_tps(model, ids, args.new, args.rounds)
    print(f"model {args.preset} ({cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}), float32; "
          f"{args.batch} prompts of {min(map(len, ids))}..{max(map(len, ids))} tokens, {args.new} new tokens each, "
          f"greedy; cache {W} slots; best of {args.rounds}\n")
    print("| decoder | tokens/s | vs recompute |")
    print("|---|---:|---:|")
    print(f"| ours: `research.generate` (KV cache) | {n / t_ours:,.0f} | {t_rec / t_ours:.1f}x |")
    print(f"| recompute the prefix every token | {n / t_rec:,.0f} | 1.0x |")
    if hf_tps is None:
        print(f"| transformers `generate` | {hf_note} | |")
    else:
        print(f"| transformers `generate` ({hf_note}) | {hf_tps:,.0f} | {hf_tps * t_rec / n:.1f}x |")
    same = sum(a == args.new for a in agree)
    print(f"\nours and the recomputing decoder agree on {same} of {len(ids)} rows entirely; every row's first "
          f"{min(agree)} new tokens agree")
    if hf_out is not None:
        hf_agree = [_common_prefix(a, b) for a, b in zip(out_ours, hf_out)]
        print(f"ours and transformers agree on {sum(a == args.new for a in hf_agree)} of {len(ids)} rows entirely; "
              f"every row's first {min(hf_agree)} new tokens agree")
    if min(agree) == 0:
        raise SystemExit("the cached and recomputed greedy decoders disagree on a first token")


if __name__ == "__main__":
    main()
