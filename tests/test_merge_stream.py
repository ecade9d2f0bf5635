"""The streaming checkpoint merger: YAML in, HF safetensors out, bounded memory."""

import json
import os
import subprocess
import sys
import weakref

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from research import merging
from research.merging import stream
from research.merging.stream.sources import TensorSource
from research.models import CheckpointError

BF16 = ml_dtypes.bfloat16


def make_ckpt(path, seed, *, layers=3, d=16, vocab=32, base=None, dtype=BF16, shards=2, tensor_bytes=None):
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(layers):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = (d, d)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (2 * d, d)
    arrs = {}
    for k, s in shapes.items():
        x = rng.standard_normal(s, dtype=np.float32) * (0.02 if base is None else 0.002)
        if base is not None:
            x += base[k].astype(np.float32)
        arrs[k] = x.astype(dtype)
    os.makedirs(path, exist_ok=True)
    names = sorted(arrs)
    groups = [names[i::shards] for i in range(shards)]
    wm = {}
    for i, ns in enumerate(groups):
        fn = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: arrs[n] for n in ns}, os.path.join(path, fn), metadata={"format": "pt"})
        wm.update({n: fn for n in ns})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(a.nbytes for a in arrs.values())}, "weight_map": wm}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"num_hidden_layers": layers, "model_type": "llama", "vocab_size": vocab}, f)
    return arrs


@pytest.fixture
def models(tmp_path):
    base = make_ckpt(tmp_path / "base", 0)
    fts = [make_ckpt(tmp_path / f"ft{i}", i + 1, base=base) for i in range(3)]
    return tmp_path, base, fts


def write_cfg(tmp, text, name="cfg.yaml"):
    p = tmp / name
    p.write_text(text)
    return str(p)


def read_out(path):
    idx = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(idx):
        out = {}
        for fn in set(json.load(open(idx))["weight_map"].values()):
            out.update(load_file(os.path.join(path, fn)))
        return out
    return load_file(os.path.join(path, "model.safetensors"))


def cli(*args, timeout=300):
    env = {**os.environ, "XLA_FLAGS": os.environ["TEST_SUBPROCESS_XLA_FLAGS"]}
    return subprocess.run([sys.executable, "-m", "research.merging", *args], capture_output=True, text=True, env=env, timeout=timeout)


TIES = """merge_method: ties
base_model: base
models:
  - model: base
  - model: ft0
    parameters: {weight: 1.0, density: 0.3}
  - model: ft1
    parameters: {weight: 0.5, density: 0.3}
  - model: ft2
    parameters: {weight: 1.0, density: 0.3}
parameters: {lambda: 0.8}
"""


def test_round_trip_sharded_in_sharded_out_equals_merging_merge(models):
    tmp, base, fts = models
    out = stream.run(stream.load(write_cfg(tmp, TIES)), str(tmp / "out"), shard_size=3000, progress=False)
    got = read_out(out)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in got.values())
    assert json.load(open(os.path.join(out, "config.json")))["num_hidden_layers"] == 3
    assert "merge_method" in open(os.path.join(out, "merge_config.yaml")).read()
    expect = merging.merge("ties", fts, base=base, weight=[1.0, 0.5, 1.0], density=0.3, lam=0.8)
    assert sorted(got) == sorted(base)
    for name in base:
        assert got[name].dtype == base[name].dtype and got[name].shape == base[name].shape
        np.testing.assert_array_equal(got[name], np.asarray(expect[name]))


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_merges_draw_the_same_masks_through_the_api_and_the_cli(models, method):
    """Keys derive from each tensor's name, so the CLI (one tensor at a time, in file
    order) and ``merging.merge`` on the whole model (in tree order) agree for one seed."""
    tmp, base, fts = models
    text = TIES.replace("merge_method: ties", f"merge_method: {method}").replace("density: 0.3", "density: 0.5")
    out = stream.run(stream.load(write_cfg(tmp, text)), str(tmp / "out"), seed=5, progress=False)
    got = read_out(out)
    expect = merging.merge(method, fts, base=base, key=jax.random.key(5), weight=[1.0, 0.5, 1.0], density=0.5,
                           lam=0.8)
    for name in base:
        np.testing.assert_array_equal(got[name], np.asarray(expect[name]), err_msg=name)
    other = merging.merge(method, fts, base=base, key=jax.random.key(6), weight=[1.0, 0.5, 1.0], density=0.5, lam=0.8)
    assert any((np.asarray(other[n]) != got[n]).any() for n in base)  # the seed matters


def _write_models(tmp_path, shapes: dict, seed: int):
    """A bf16 base (entries ~ N(0, 0.02)) and 3 fine-tunes of it (changes ~ N(0, 0.002)) of
    tensors ``shapes``, each one ``model.safetensors`` under ``tmp_path/{base,ft0,ft1,ft2}``."""
    rng = np.random.default_rng(seed)
    base = {k: (rng.standard_normal(s) * 0.02).astype(BF16) for k, s in shapes.items()}
    fts = [{k: (v.astype(np.float32) + rng.standard_normal(v.shape) * 0.002).astype(BF16) for k, v in base.items()}
           for _ in range(3)]
    for name, tensors in [("base", base)] + [(f"ft{i}", t) for i, t in enumerate(fts)]:
        os.makedirs(tmp_path / name)
        save_file(tensors, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
    return base, fts


@pytest.mark.parametrize("rescale_mode", ["l1", "inverse"])
def test_della_on_a_3d_tensor_gives_the_api_s_tensors_whole_and_in_row_blocks(tmp_path, monkeypatch, rescale_mode):
    """An MoE-style ``[experts, out, in]`` tensor, which DELLA ranks along dim 1
    (``test_della_ranks_along_dim_1_as_mergekit``): the CLI, merging it whole and
    in blocks of rows, draws the masks ``merging.merge`` draws for the seed.  With
    the L1 rescale the blocks are rows of its ``[-1, in]`` view, some across two
    experts, their masks made from strips of an expert's columns
    (``expert_masks``); with the inverse one (a divisor per entry), each expert
    is merged strip by strip."""
    from research.merging import sparsify
    from research.merging.stream import chunked, expert_masks
    shapes = {"model.layers.0.mlp.experts.w": (8, 6, 10), "model.layers.0.mlp.gate.weight": (8, 12)}
    base, fts = _write_models(tmp_path, shapes, seed=0)
    text = ("merge_method: della\nbase_model: base\nmodels:\n" + "".join(f"  - model: ft{i}\n" for i in range(3))
            + f"parameters:\n  density: 0.5\n  epsilon: 0.2\n  rescale: true\n  rescale_mode: {rescale_mode}\n")
    cfg = write_cfg(tmp_path, text)
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 120)  # draw blocks of 2 rows of the 3-D tensor
    expect = merging.merge("della", fts, base=base, key=jax.random.key(3), density=0.5, epsilon=0.2, rescale=True,
                           rescale_mode=rescale_mode)
    whole = read_out(stream.run(stream.load(cfg), str(tmp_path / "whole"), progress=False, seed=3))
    monkeypatch.setattr(chunked, "MIN_BYTES", 100)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 100)  # flat blocks of 5 rows of 10; strips of 8 and 2 columns
    calls, real = [], chunked.merge_blocks
    monkeypatch.setattr(chunked, "merge_blocks", lambda *a, **k: calls.append(a[2].name) or real(*a, **k))
    numba_merged, real_merge = [], chunked.masks_merge  # the merge pass on the drawn masks, where it applies
    monkeypatch.setattr(chunked, "masks_merge", lambda *a, **k: numba_merged.append(
        (np.shape(a[0]), (out := real_merge(*a, **k)) is not None)) or out)
    strips, real_cols = [], TensorSource.columns
    monkeypatch.setattr(TensorSource, "columns", lambda self, n, rows, cols: strips.append((rows, cols)) or real_cols(
        self, n, rows, cols))
    blocks = read_out(stream.run(stream.load(cfg), str(tmp_path / "blocks"), progress=False, seed=3))
    assert sorted(calls) == sorted(shapes)
    name = "model.layers.0.mlp.experts.w"
    merged = [shape for shape, ok in numba_merged if ok and shape[-1] == 10]
    assert sorted(set(strips)) == [((6 * e, 6 * e + 6), c) for e in range(8) for c in ((0, 8), (8, 10))]
    held = stream.make_plan(stream.load(cfg)).held()["model.layers.0.mlp.experts.w"]  # what --dry-run counts
    if rescale_mode == "l1":
        assert merged == [(5, 10)] * 9 + [(3, 10)]  # rows 5:10 hold experts 0 and 1
        assert held > expert_masks.ExpertMasks.held_bytes((8, 6, 10), 3, 2, 100)
    else:  # the XLA program on each strip, an expert's output written whole
        assert merged == []
        # two experts' output rows, and a strip (6 x 8) of 4 inputs with 3 models' ranks, masks and divisors,
        # and 5 float32 copies
        assert held == expert_masks.inverse_held_bytes((8, 6, 10), 4, 2, 2, 100) == 2 * 6 * 10 * 2 + 48 * (
            4 * 2 + 3 * (2 + 1 + 4) + 5 * 4)
    for name in shapes:
        np.testing.assert_array_equal(whole[name], np.asarray(expect[name]), err_msg=name)
        np.testing.assert_array_equal(blocks[name], np.asarray(expect[name]), err_msg=name)
    if rescale_mode == "l1":  # the sums pass's masks, kept, serve the merge pass; past MASK_BUDGET made again
        made, real_make = [], expert_masks.ExpertMasks._make
        monkeypatch.setattr(expert_masks.ExpertMasks, "_make", lambda self, e, **k: made.append(e) or real_make(self, e, **k))
        for budget, passes in ((chunked.MASK_BUDGET, 1), (0, 2)):
            monkeypatch.setattr(chunked, "MASK_BUDGET", budget)
            made.clear()
            again = read_out(stream.run(stream.load(cfg), str(tmp_path / f"budget{budget}"), progress=False, seed=3))
            np.testing.assert_array_equal(again["model.layers.0.mlp.experts.w"],
                                          np.asarray(expect["model.layers.0.mlp.experts.w"]))
            assert made == list(range(8)) * passes  # each expert once a pass
    expert = "model.layers.0.mlp.experts.w"
    fts[2][expert][5, 4, 9] = np.nan  # in a strip of 2 columns (L1: made before its block's screen)
    save_file(fts[2], str(tmp_path / "ft2" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(stream.MergeFailed, match=rf"tensor {expert}: .*model 2 .*NaN or Inf"):
        stream.run(stream.load(cfg), str(tmp_path / "nan"), progress=False, seed=3)


def test_della_blocks_are_flat_only_where_expert_strips_make_their_masks():
    """DELLA reads a 3-D tensor in rows of its ``[-1, in]`` view only where its masks come
    from column strips (the numba kernels, rows of several entries); else whole
    experts, whose ranks the block holds."""
    from research.merging.stream.chunked import block_shape
    assert block_shape((4, 6, 10), "della", True) == block_shape((4, 6, 10), "della_linear", True) == (24, 10)
    assert block_shape((4, 6, 10), "della", False) == (4, 6, 10)  # no host kernels
    assert block_shape((4, 6, 1), "della", True) == (4, 6, 1)
    assert block_shape((2, 4, 6, 10), "della", True) == (2, 4, 6, 10)  # ranks along axis 1 of [2, 4, 60]
    assert block_shape((6, 10), "della", True) == (6, 10)


def test_xla_sums_and_screens_of_a_whole_expert_block_take_it_in_row_slices(tmp_path, monkeypatch):
    """Without the CPU backend, DELLA merges a 3-D tensor a whole expert a block; what
    XLA checks (NaN/Inf) and sums (the L1 rescale) of a block it is given in slices
    of about ``CHUNK_BYTES`` (XLA copies its inputs): the merge is
    ``merging.merge``'s to summation order, and a NaN in a block's last slice is
    still named."""
    from research.merging import cpu, sparsify, tree
    from research.merging.stream import chunked
    name = "model.layers.0.mlp.experts.w"
    base, fts = _write_models(tmp_path, {name: (4, 6, 10)}, seed=4)
    text = ("merge_method: della\nbase_model: base\nmodels:\n" + "".join(f"  - model: ft{i}\n" for i in range(3))
            + "parameters:\n  density: 0.5\n  epsilon: 0.2\n")
    cfg = write_cfg(tmp_path, text)
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 60)  # a draw block an expert
    monkeypatch.setattr(cpu, "ENABLED", False)
    monkeypatch.setattr(chunked, "MIN_BYTES", 100)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 40)  # blocks of one expert (120 B), slices of 2 rows of 10
    reads, real_read = [], chunked.Tensor.read
    monkeypatch.setattr(chunked.Tensor, "read", lambda self, sp: reads.append(self.shape) or real_read(self, sp))
    given, real_sums, real_check = [], chunked._kept_sums, tree.check_finite
    monkeypatch.setattr(chunked, "_kept_sums", lambda *a: given.append(np.shape(a[0])) or real_sums(*a))
    monkeypatch.setattr(tree, "check_finite", lambda ms, names: given.extend(
        np.shape(x) for m in ms for x in m.values()) or real_check(ms, names))
    got = read_out(stream.run(stream.load(cfg), str(tmp_path / "out"), progress=False, seed=3))
    assert given and set(given) == {(2, 10)} and set(reads) == {(4, 6, 10)}
    expect = merging.merge("della", fts, base=base, key=jax.random.key(3), density=0.5, epsilon=0.2)
    np.testing.assert_allclose(got[name].astype(np.float32), np.asarray(expect[name]).astype(np.float32),
                               rtol=1e-2, atol=1e-6)
    fts[1][name][2, 5, 7] = np.nan  # expert 2's last slice
    save_file(fts[1], str(tmp_path / "ft1" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(stream.MergeFailed, match=rf"tensor {name}: .*model 1 .*NaN or Inf"):
        stream.run(stream.load(cfg), str(tmp_path / "nan"), progress=False, seed=3)


def test_della_on_a_3d_tensor_with_tiny_inputs_and_a_model_keeping_all_gives_the_api_s_tensors(tmp_path, monkeypatch):
    """The numba merge pass on DELLA's masks of a 3-D tensor in blocks: a model at density 1
    (no mask) and inputs below 2**-32 (merged again by the XLA program) give
    ``merging.merge``'s tensors."""
    from research.merging import sparsify
    from research.merging.stream import chunked
    shapes = {"model.layers.0.mlp.experts.w": (8, 6, 10)}
    base, fts = _write_models(tmp_path, shapes, seed=6)
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 120)  # draw blocks of 2 rows
    w = fts[1]["model.layers.0.mlp.experts.w"]
    w[5, 2, 3] = np.float32(2.0**-40)  # a non-zero magnitude below 2**-32
    save_file(fts[1], str(tmp_path / "ft1" / "model.safetensors"), metadata={"format": "pt"})
    text = ("merge_method: della\nbase_model: base\nmodels:\n"
            + "".join(f"  - model: ft{i}\n    parameters: {{density: {d}}}\n" for i, d in enumerate([0.5, 0.7, 1.0]))
            + "parameters:\n  epsilon: 0.2\n")
    monkeypatch.setattr(chunked, "MIN_BYTES", 100)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 480)  # blocks of 4 rows
    merged, real_merge = [], chunked.masks_merge
    monkeypatch.setattr(chunked, "masks_merge", lambda *a, **k: merged.append(
        (out := real_merge(*a, **k)) is not None) or out)
    got = read_out(stream.run(stream.load(write_cfg(tmp_path, text)), str(tmp_path / "out"), progress=False, seed=3))
    expect = merging.merge("della", fts, base=base, key=jax.random.key(3), density=[0.5, 0.7, 1.0], epsilon=0.2)
    name = "model.layers.0.mlp.experts.w"
    np.testing.assert_array_equal(got[name], np.asarray(expect[name]))
    assert merged == [True, True]  # both blocks of 4 rows


# one method of each block path: elementwise, trimmed, SLERP's and Model Stock's sums, DARE's masks with the
# L1 sums or drawn in the merge pass, DELLA's from expert strips, Model Stock's ratio per row (flat); DELLA
# with the inverse rescale (merged by expert strips)
@pytest.mark.parametrize("method,extra", [("linear", ""), ("ties", ""), ("breadcrumbs", ""), ("slerp", ""),
                                          ("model_stock", ""), ("model_stock", "filter_wise: true"),
                                          ("dare_ties", ""), ("dare_linear", "  rescale_mode: inverse\n"),
                                          ("della", ""), ("della", "  rescale_mode: inverse\n")])
def test_fused_expert_tensors_merge_in_blocks_within_their_leading_rows(tmp_path, monkeypatch, method, extra):
    """``[experts, out, in]`` tensors (one of them a single expert) merged in blocks give
    the tensors of whole-tensor merges.  The methods that see a tensor in flat order
    alone (``chunked.FLAT_METHODS``), Model Stock (with ``filter_wise``, a ratio per
    row of that view, as mergekit's), DARE, whose masks are drawn from any row on,
    and DELLA without the inverse rescale, whose masks come from strips of an
    expert's columns, read blocks of its ``[-1, in]`` view, a few rows each, some
    across two experts, so memory is bounded within an expert too; DELLA with the
    inverse rescale reads strips of an expert's columns only, and writes an
    expert's rows at once."""
    from research.merging import sparsify
    from research.merging.stream import chunked
    shapes = {"model.layers.0.mlp.experts.gate_up_proj": (3, 12, 10),
              "model.layers.0.mlp.experts.down_proj": (1, 12, 10), "model.layers.0.mlp.router.weight": (3, 10)}
    _write_models(tmp_path, shapes, seed=1)
    filter_wise = extra == "filter_wise: true"
    text = _every_method_config(method, density="0.5")
    cfg = write_cfg(tmp_path, text.replace("filter_wise: false", extra) if filter_wise else text + extra)
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 200)  # draw blocks of one expert, in both runs
    whole = read_out(stream.run(stream.load(cfg), str(tmp_path / "whole"), progress=False, seed=2))
    monkeypatch.setattr(chunked, "MIN_BYTES", 100)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 100)  # 5 rows of 10 bf16 entries
    reads, real = [], chunked.Tensor.read
    monkeypatch.setattr(chunked.Tensor, "read",
                        lambda self, sp: reads.append((self.name, self.shape, sp)) or real(self, sp))
    blocks = read_out(stream.run(stream.load(cfg), str(tmp_path / "blocks"), progress=False, seed=2))
    for name in shapes:
        np.testing.assert_array_equal(blocks[name], whole[name], err_msg=name)
    flat = (method in chunked.FLAT_METHODS or method in chunked.DRAWN_FLAT_METHODS or method == "model_stock"
            or (method == "della" and "inverse" not in extra))
    seen = lambda name: [(shape, sp) for n, shape, sp in reads if n == name]
    name = "model.layers.0.mlp.experts.gate_up_proj"
    if method == "della" and "inverse" in extra:  # column strips only, no block of rows
        assert seen(name) == seen("model.layers.0.mlp.experts.down_proj") == []
        return
    assert {shape for shape, _ in seen(name)} == {(36, 10) if flat else (3, 12, 10)}
    assert max(b - a for _, (a, b) in seen(name)) == (5 if flat else 1)  # 5 rows, or one expert
    assert not flat or (10, 15) in [sp for _, sp in seen(name)]  # rows of experts 0 and 1
    single = seen("model.layers.0.mlp.experts.down_proj")  # one expert: in blocks only where they are flat
    assert ({shape for shape, _ in single}, max((b - a for _, (a, b) in single), default=0)) == (
        ({(12, 10)}, 5) if flat else (set(), 0))


@pytest.mark.parametrize("without", ["random_ok", "usable"])
def test_dare_on_fused_experts_in_blocks_drawn_by_jax_gives_the_xla_merge(tmp_path, monkeypatch, without):
    """Where the numba threefry cannot draw DARE's masks (``random_ok``: another PRNG),
    a fused tensor is merged in blocks of whole experts, each drawn by
    ``jax.random``; where it could but the merge pass does not apply
    (``usable``), in flat blocks, the XLA draws cut at the block's first row.
    Both give ``merging.merge``'s XLA program's tensors."""
    from research.merging import cpu, sparsify
    from research.merging.cpu import kernels
    from research.merging.stream import chunked
    shapes = {"model.layers.0.mlp.experts.gate_up_proj": (3, 12, 10), "model.layers.0.mlp.router.weight": (3, 10)}
    base, fts = _write_models(tmp_path, shapes, seed=5)
    text = ("merge_method: dare_linear\nbase_model: base\nmodels:\n" + "".join(f"  - model: ft{i}\n" for i in range(3))
            + "parameters: {density: 0.5, rescale_mode: inverse}\n")
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 200)  # draw blocks of one expert
    monkeypatch.setattr(cpu, "ENABLED", False)
    expect = merging.merge("dare_linear", fts, base=base, key=jax.random.key(2), density=0.5, rescale_mode="inverse")
    monkeypatch.setattr(chunked, "MIN_BYTES", 100)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 100)  # 5 rows of 10 bf16 entries
    monkeypatch.setattr(kernels, without, lambda *a: False)
    reads, real = [], chunked.Tensor.read
    monkeypatch.setattr(chunked.Tensor, "read", lambda self, sp: reads.append((self.shape, sp)) or real(self, sp))
    got = read_out(stream.run(stream.load(write_cfg(tmp_path, text)), str(tmp_path / "out"), progress=False, seed=2))
    for name in shapes:
        np.testing.assert_array_equal(got[name], np.asarray(expect[name]), err_msg=name)
    flat = without == "usable"
    assert ((36, 10), (10, 15)) in reads if flat else ((3, 12, 10), (1, 2)) in reads


def test_global_trim_over_fused_expert_tensors_in_flat_blocks_equals_the_api_s(tmp_path, monkeypatch):
    """``trim: global`` counts ties in flat order across tensors; blocks of rows of a 3-D
    tensor's ``[-1, in]`` view keep that order, so the CLI gives ``merging.merge``'s tensors."""
    from research.merging.stream import chunked
    shapes = {"model.layers.0.mlp.experts.gate_up_proj": (3, 12, 10), "model.layers.0.mlp.router.weight": (3, 10)}
    base, fts = _write_models(tmp_path, shapes, seed=4)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 60)  # 3 rows of 10 bf16 entries
    text = ("merge_method: ties\nbase_model: base\nmodels:\n" + "".join(f"  - model: ft{i}\n" for i in range(3))
            + "parameters: {density: 0.3, trim: global}\n")
    got = read_out(stream.run(stream.load(write_cfg(tmp_path, text)), str(tmp_path / "out"), progress=False))
    expect = merging.merge("ties", fts, base=base, density=0.3, trim="global")
    for name in shapes:
        np.testing.assert_array_equal(got[name], np.asarray(expect[name]), err_msg=name)


def test_single_file_output_and_every_method_runs(models):
    tmp, base, fts = models
    for method in merging.METHODS:
        params = {"slerp": "t: 0.3", "della": "density: 0.5\n  epsilon: 0.1", "della_linear": "density: 0.5\n  epsilon: 0.1"}
        extra = params.get(method, "density: 0.5" if method in ("dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "ties") else "")
        ms = ["ft0"] if method in ("slerp", "passthrough") else ["ft0", "ft1", "ft2"]
        text = f"merge_method: {method}\nbase_model: base\nmodels:\n" + "".join(f"  - model: {m}\n" for m in ms)
        if extra:
            text += f"parameters:\n  {extra}\n"
        out = stream.run(stream.load(write_cfg(tmp, text, f"{method}.yaml")), str(tmp / f"o_{method}"), progress=False)
        got = read_out(out)
        assert os.path.isfile(os.path.join(out, "model.safetensors")) and sorted(got) == sorted(base), method


def test_gradients_and_filters(models):
    tmp, base, fts = models
    text = """merge_method: task_arithmetic
base_model: base
models:
  - model: ft0
    parameters:
      weight: [0.0, 1.0]
  - model: ft1
    parameters:
      weight: [{filter: mlp, value: 2.0}, {value: 0.0}]
"""
    got = read_out(stream.run(stream.load(write_cfg(tmp, text)), str(tmp / "g"), progress=False))
    f32 = lambda a: a.astype(np.float32)
    for i, w0 in enumerate([0.0, 0.5, 1.0]):  # layer i of 3 -> gradient position i/2
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        want = f32(base[name]) + w0 * (f32(fts[0][name]) - f32(base[name]))
        np.testing.assert_allclose(f32(got[name]), want.astype(BF16).astype(np.float32), rtol=1e-2, atol=1e-3)
        mlp = f"model.layers.{i}.mlp.up_proj.weight"
        want = f32(base[mlp]) + w0 * (f32(fts[0][mlp]) - f32(base[mlp])) + 2.0 * (f32(fts[1][mlp]) - f32(base[mlp]))
        np.testing.assert_allclose(f32(got[mlp]), want.astype(BF16).astype(np.float32), rtol=1e-2, atol=1e-3)


def test_random_methods_are_reproducible_with_seed(models):
    tmp, *_ = models
    text = TIES.replace("ties", "dare_ties")
    a = read_out(stream.run(stream.load(write_cfg(tmp, text)), str(tmp / "a"), seed=7, progress=False))
    b = read_out(stream.run(stream.load(write_cfg(tmp, text)), str(tmp / "b"), seed=7, progress=False))
    c = read_out(stream.run(stream.load(write_cfg(tmp, text)), str(tmp / "c"), seed=8, progress=False))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_dry_run_prints_the_plan_and_writes_nothing(models):
    tmp, *_ = models
    r = cli(write_cfg(tmp, TIES), str(tmp / "dry"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "model.layers.2.mlp.up_proj.weight" in r.stdout and "(32, 16)" in r.stdout
    assert "bytes to read" in r.stdout and "estimated peak memory" in r.stdout
    assert "most while merging lm_head.weight;" in r.stdout  # the largest tensor
    assert not (tmp / "dry").exists()


def test_the_dry_run_lists_each_parameter_as_the_merge_will_use_it(models, capsys):
    """Parameters the same for every tensor are listed once, the method's defaults
    marked; one that varies (a gradient over the layers, a filter) is given beside
    each tensor; a random method's seed is listed, a deterministic one's not; and
    each tensor's dtype, with the one written where ``dtype`` changes it."""
    tmp, *_ = models
    text = """merge_method: dare_ties
base_model: base
models:
  - model: ft0
    parameters: {weight: 1.0, density: [0.2, 0.8]}
  - model: ft1
    parameters:
      weight: 0.5
      density: [{filter: mlp, value: 0.3}, {value: 0.6}]
parameters: {lambda: 0.9}
dtype: float32
"""
    assert stream.run(stream.load(write_cfg(tmp, text)), str(tmp / "dry"), seed=3, dry_run=True, progress=False) is None
    out = capsys.readouterr().out
    assert out.startswith("merge_method: dare_ties (Yu et al. 2024")
    listed = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.startswith("  ")}
    assert listed["weight"] == "1, 0.5"
    assert listed["lambda"] == "0.9"
    assert listed["normalize"] == "false  (default)"
    assert listed["rescale"] == "true  (default)"
    assert listed["consensus"] == "sum  (default)"
    assert listed["density"] == "varies by tensor (below)"
    assert listed["seed"] == "3  (--seed)"
    # 3 layers: the gradient gives 0.2, 0.5 and 0.8; the filter 0.3 on the MLP, 0.6 elsewhere
    for name, density in [("model.layers.0.self_attn.q_proj.weight", "0.2, 0.6"),
                          ("model.layers.1.mlp.up_proj.weight", "0.5, 0.3"),
                          ("model.layers.2.self_attn.q_proj.weight", "0.8, 0.6")]:
        assert listed[name].endswith(f"bfloat16 -> float32  density={density}"), listed[name]
    assert not (tmp / "dry").exists()

    stream.run(stream.load(write_cfg(tmp, TIES)), str(tmp / "dry"), dry_run=True, progress=False)
    listed = {line.split()[0]: line.split(None, 1)[1] for line in capsys.readouterr().out.splitlines()
              if line.startswith("  ")}
    assert listed["weight"] == "1, 0.5, 1" and listed["density"] == "0.3, 0.3, 0.3"  # the base is no model
    assert listed["lambda"] == "0.8" and "seed" not in listed
    assert listed["model.layers.0.mlp.up_proj.weight"].split() == ["(32,", "16)", "bfloat16"]


def test_merging_plain_checkpoints_loads_no_model_code(models):
    """A merge of safetensors checkpoints imports neither flax nor the model package
    (peft adapters are recognised without them)."""
    tmp, *_ = models
    probe = ("import sys\nfrom research.merging.__main__ import main\n"
             f"assert main([{write_cfg(tmp, TIES)!r}, {str(tmp / 'out')!r}, '--no-progress']) == 0\n"
             "print(sorted(m for m in sys.modules if m == 'flax' or m.startswith('research.models')))")
    env = {**os.environ, "XLA_FLAGS": os.environ["TEST_SUBPROCESS_XLA_FLAGS"]}
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    assert any(f.endswith(".safetensors") for f in os.listdir(tmp / "out"))


def _err(tmp, text, match, **kw):
    with pytest.raises((stream.MergeFailed, stream.ConfigError, CheckpointError, merging.MergeError), match=match):
        stream.run(stream.load(write_cfg(tmp, text)), str(tmp / "bad"), progress=False, **kw)
    assert not (tmp / "bad").exists()


def test_bad_input(models):
    tmp, base, fts = models
    _err(tmp, TIES.replace("parameters: {lambda: 0.8}", "parameters: {lambda: 0.8}\nmerge_methd: x"), r"cfg.yaml:12: unknown key 'merge_methd'")
    _err(tmp, TIES.replace("- model: ft2", "- model: ft9"), r"ft9: no such model")
    _err(tmp, TIES.replace("base_model: base\n", ""), "needs a base_model")
    _err(tmp, TIES.replace("density: 0.3}\n  - model: ft2", "density: 1.7}\n  - model: ft2"), r"tensor .*density.*1.7 for model 1 \(.*ft1\)")
    os.remove(tmp / "ft2" / "model-00002-of-00002.safetensors")
    _err(tmp, TIES, "shard model-00002-of-00002.safetensors .* is missing")
    # names / shapes that differ, listed with the model
    make_ckpt(tmp / "odd", 5, layers=2)
    _err(tmp, TIES.replace("- model: ft2", "- model: odd"), r"odd: tensor names differ .*missing \['model.layers.2")
    make_ckpt(tmp / "wide", 5, d=24)
    _err(tmp, TIES.replace("- model: ft2", "- model: wide"), r"wide: tensor shapes differ")
    # a corrupt header
    make_ckpt(tmp / "corrupt", 6)
    p = tmp / "corrupt" / "model-00001-of-00002.safetensors"
    p.write_bytes(p.read_bytes()[:20])
    _err(tmp, TIES.replace("- model: ft2", "- model: corrupt"), "corrupt or truncated")
    # pickled PyTorch weights are refused
    os.makedirs(tmp / "pt")
    (tmp / "pt" / "pytorch_model.bin").write_bytes(b"\x80\x02")
    _err(tmp, TIES.replace("- model: ft2", "- model: pt"), "unpickle")


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_nan_in_a_late_tensor_fails_naming_it_and_leaves_no_partial_output(models, method):
    """Earlier tensors are already being written (behind the merge) when the bad one
    is reached: the error names tensor and model, and no directory is left over."""
    tmp, base, fts = models
    name = TensorSource(str(tmp / "base")).names[-1]  # the last tensor merged
    bad = dict(fts[1])
    bad[name] = bad[name].copy()
    bad[name].reshape(-1)[0] = np.nan
    os.makedirs(tmp / "nan")
    save_file(bad, str(tmp / "nan" / "model.safetensors"), metadata={"format": "pt"})
    text = TIES.replace("- model: ft1", "- model: nan")
    if method == "task_arithmetic":
        text = text.replace("merge_method: ties", f"merge_method: {method}").replace(", density: 0.3", "")
    _err(tmp, text, rf"tensor {name}: leaf .* of model 1 \(.*nan\) holds NaN or Inf")
    assert [d for d in os.listdir(tmp) if d.startswith("bad")] == []


def test_compiled_programs_are_kept_between_cli_runs(models, tmp_path_factory):
    tmp, *_ = models
    ta = TIES.replace("merge_method: ties", "merge_method: task_arithmetic").replace(", density: 0.3", "")
    cfg = write_cfg(tmp, ta)  # an XLA merge program
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "XLA_FLAGS": os.environ["TEST_SUBPROCESS_XLA_FLAGS"], "RESEARCH_MERGE_CACHE": str(cache)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the test run's shared cache (conftest) would take precedence
    run = lambda out, *extra: subprocess.run([sys.executable, "-m", "research.merging", cfg, str(tmp / out), "--no-progress", *extra],
                                             capture_output=True, text=True, env=env, timeout=300)
    assert run("off", "--no-compile-cache").returncode == 0
    assert os.listdir(cache) == []
    assert run("first").returncode == 0
    kept = os.listdir(cache)
    assert any("merge_one_leaf" in f for f in kept)
    assert run("second").returncode == 0
    assert sorted(os.listdir(cache)) == sorted(kept)  # nothing new compiled
    a, b, c = (read_out(str(tmp / o)) for o in ("off", "first", "second"))
    assert all(np.array_equal(a[k], b[k]) and np.array_equal(a[k], c[k]) for k in a)


def test_vocab_mismatch_is_refused_unless_allowed(models):
    tmp, base, fts = models
    make_ckpt(tmp / "bigvocab", 9, vocab=40)
    text = TIES.replace("- model: ft2", "- model: bigvocab")
    _err(tmp, text, "40 vocabulary rows.*--allow-vocab-mismatch")
    out = read_out(stream.run(stream.load(write_cfg(tmp, text)), str(tmp / "v"), allow_vocab_mismatch=True, progress=False))
    assert out["model.embed_tokens.weight"].shape == (32, 16)


def test_existing_output_is_refused_without_force(models):
    tmp, *_ = models
    cfg = write_cfg(tmp, TIES)
    os.makedirs(tmp / "exists")
    r = cli(cfg, str(tmp / "exists"))
    assert r.returncode == 2 and "--force" in r.stderr
    assert cli(cfg, str(tmp / "exists"), "--force", "--no-progress").returncode == 0


def test_memory_stays_bounded_on_a_model_larger_than_the_bound(tmp_path):
    """4 inputs of ~200 MB each: holding them whole needs 800 MB; we allow 420 MB over the
    interpreter's own footprint (largest tensor 8 MB bf16)."""
    base = make_ckpt(tmp_path / "base", 0, layers=12, d=1024, vocab=4096, shards=2)
    for i in range(3):
        make_ckpt(tmp_path / f"ft{i}", i + 1, layers=12, d=1024, vocab=4096, shards=2, base=base)
    model_bytes = sum(a.nbytes for a in base.values())
    assert model_bytes > 60e6
    cfg = write_cfg(tmp_path, "merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0\n  - model: ft1\n  - model: ft2\n"
                              "parameters: {density: 0.2}\n")
    probe = ("import resource, sys, runpy; sys.argv=['research-merge', %r, %r, '--shard-size', '20MB', '--no-progress'];"
             "import jax, research.merging;"
             "base=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
             "from research.merging.__main__ import main; rc=main(sys.argv[1:]);"
             "print('RSS', base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rc)") % (cfg, str(tmp_path / "out"))
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": os.environ["TEST_SUBPROCESS_XLA_FLAGS"]}, timeout=600)
    line = [l for l in r.stdout.splitlines() if l.startswith("RSS")][0]
    before, after, rc = (int(x) for x in line.split()[1:])
    grew = (after - before) * 1024
    assert rc == 0
    assert grew < 4 * model_bytes * 0.55, (grew, 4 * model_bytes)


def _every_method_config(method, density="0.3"):
    params = {"slerp": "t: 0.3", "della": "density: 0.5\n  epsilon: 0.1", "della_linear": "density: 0.5\n  epsilon: 0.1",
              "model_stock": "filter_wise: false", "negate": "lambda: 0.5", "passthrough": "scale: 0.5"}
    extra = params.get(method, f"density: {density}" if method in ("dare_ties", "dare_linear", "breadcrumbs",
                                                                  "breadcrumbs_ties", "ties") else "")
    ms = ["ft0"] if method in ("slerp", "passthrough") else ["ft0", "ft1", "ft2"]
    text = f"merge_method: {method}\nbase_model: base\nmodels:\n" + "".join(f"  - model: {m}\n" for m in ms)
    return text + (f"parameters:\n  {extra}\n" if extra else "")


@pytest.fixture
def wide_models(tmp_path):
    base = make_ckpt(tmp_path / "base", 0, d=24, vocab=40)
    fts = [make_ckpt(tmp_path / f"ft{i}", i + 1, base=base, d=24, vocab=40) for i in range(3)]
    return tmp_path, base, fts


@pytest.mark.parametrize("method", merging.METHODS)
def test_row_blocks_give_the_tensors_of_whole_tensor_merges(wide_models, monkeypatch, method):
    """Every method, merged in blocks of 4 rows (thresholds, rescale sums, SLERP's and
    Model Stock's cosines streamed over the blocks), equals the whole-tensor merge."""
    from research.merging import sparsify
    from research.merging.stream import chunked
    tmp, *_ = wide_models
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 64)  # several draw blocks per tensor, in both runs
    cfg = write_cfg(tmp, _every_method_config(method))
    whole = read_out(stream.run(stream.load(cfg), str(tmp / "whole"), progress=False, seed=1))
    monkeypatch.setattr(chunked, "MIN_BYTES", 600)  # every bf16 matrix but norms is merged in blocks
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 200)
    calls = []
    real = chunked.merge_blocks
    monkeypatch.setattr(chunked, "merge_blocks", lambda *a, **k: calls.append(a[2].name) or real(*a, **k))
    blocks = read_out(stream.run(stream.load(cfg), str(tmp / "blocks"), progress=False, seed=1))
    assert len(calls) == 2 + 2 * 3  # embeddings, lm_head, and q/up of 3 layers went through blocks
    for name in whole:
        np.testing.assert_array_equal(blocks[name], whole[name], err_msg=name)


@pytest.mark.parametrize("dtype_line, chunked_tensors, rows_per_block", [
    ("", {f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)}, 20),
    ("dtype: float32\n", {"model.embed_tokens.weight", "lm_head.weight"}
     | {f"model.layers.{i}.{m}.weight" for i in range(3) for m in ("self_attn.q_proj", "mlp.up_proj")}, 10),
])
def test_row_blocks_are_sized_in_bytes_of_the_dtype_merged_in(wide_models, monkeypatch, dtype_line, chunked_tensors,
                                                              rows_per_block):
    """bf16 checkpoints merged under ``dtype: float32`` hold float32 inputs: twice the
    bytes, so more tensors go through blocks, of half the rows."""
    from research.merging import sparsify
    from research.merging.stream import chunked
    tmp, *_ = wide_models
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 24)  # draw blocks of one row: blocks of any number of rows
    monkeypatch.setattr(chunked, "MIN_BYTES", 2000)  # bf16: 2304-byte up_proj; float32: 2304-byte q_proj and up
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 960)  # 20 bf16 rows of 24, 10 float32 ones
    seen, real = {}, chunked.merge_blocks

    def merge_blocks(method, opts, t, *args):
        seen[t.name] = t.step
        return real(method, opts, t, *args)

    monkeypatch.setattr(chunked, "merge_blocks", merge_blocks)
    cfg = write_cfg(tmp, _every_method_config("ties") + dtype_line)
    stream.run(stream.load(cfg), str(tmp / "out"), progress=False)
    assert set(seen) == chunked_tensors
    assert set(seen.values()) == {rows_per_block}


def test_the_dry_run_s_peak_estimate_counts_the_dtype_merged_in_and_dare_s_kept_masks(wide_models, monkeypatch):
    from research.merging.stream import chunked
    tmp, *_ = wide_models
    monkeypatch.setattr(chunked, "MIN_BYTES", 1000)  # bf16: embeddings, lm_head (1920 B), q (1152 B), up in blocks
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 1 << 20)  # one block each
    est = lambda method, dtype="": stream.make_plan(stream.load(write_cfg(
        tmp, _every_method_config(method) + dtype, f"{method}{len(dtype)}.yaml"))).in_flight()
    up = 48 * 24  # the largest tensor's entries
    held = stream.make_plan(stream.load(write_cfg(tmp, _every_method_config("ties"), "held.yaml"))).held()
    assert max(held, key=held.get) == "model.layers.0.mlp.up_proj.weight"  # what --dry-run names
    assert est("dare_ties") - est("ties") == up * 3 // 8  # 3 models' masks, a bit an entry
    # float32: the bf16 inputs are read as they are, the output takes 2 more bytes an entry
    assert est("ties", "dtype: float32\n") - est("ties") == 2 * up


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak from /proc/self/status")
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_the_dry_run_s_peak_estimate_is_near_the_peak_the_merge_reaches(wide_models, method):
    """The estimate counts the process itself (its resident memory when planned, plus
    the programs it compiles: numba's kernels for ``ties``), which is most of a
    small merge's peak: the merge, in that process, peaks within 30% of it."""
    tmp, *_ = wide_models
    cfg = write_cfg(tmp, _every_method_config(method))
    code = ("import sys; from research.merging import stream; mc = stream.load(sys.argv[1]); "
            "est = stream.make_plan(mc).peak_estimate(); stream.run(mc, sys.argv[2], progress=False); "
            "print(est, [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    env = {**os.environ, "XLA_FLAGS": os.environ["TEST_SUBPROCESS_XLA_FLAGS"]}
    r = subprocess.run([sys.executable, "-c", code, cfg, str(tmp / "out")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    est, peak = map(int, r.stdout.split())
    assert 0.7 <= peak / est <= 1.3, (peak / 2**30, est / 2**30)


def test_a_streamed_pass_lets_each_block_go_when_it_asks_for_the_next(monkeypatch):
    """While a pass works on a block, it holds that block and the one read ahead,
    never an earlier one (memory is two blocks, not three), as the passes
    iterate: ``enumerate(t.blocks_at())`` and ``t.blocks()``."""
    from research.merging.stream import chunked
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 4 * 8 * 4)  # 4 rows of 8 float32
    reads = []  # (first row, weak reference) of every array read

    def rows(value):
        def read(a, b):
            x = np.full((b - a, 8), value, np.float32)
            reads.append((a, weakref.ref(x)))
            return x
        return read

    t = chunked.Tensor("w", (20, 8), rows(-1), [rows(0), rows(1)], itemsize=4, own_shape=(2, 10, 8))
    assert t.step == 4
    for c, ((base, models), sp) in enumerate(t.blocks_at()):
        assert sp == (4 * c, min(4 * c + 4, 20)) and base.shape[0] == sp[1] - sp[0]
        assert [a for a, r in reads if r() is not None and a < sp[0]] == [], f"block {c}: earlier blocks held"
    del base, models
    reads.clear()
    starts = iter(range(0, 20, 4))
    for base, models in t.blocks():
        start = next(starts)
        assert [a for a, r in reads if r() is not None and a < start] == []


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della"])
def test_dare_in_blocks_draws_its_masks_once_where_they_fit_the_budget(wide_models, monkeypatch, method):
    """With the L1 rescale, a tensor merged in blocks keeps the masks of its sums pass
    (DARE's or DELLA's, bit-packed) for its merge pass; past ``MASK_BUDGET`` it draws them again.  Both
    give the whole-tensor merge."""
    from research.merging import sparsify
    from research.merging.cpu import kernels
    from research.merging.stream import chunked
    tmp, *_ = wide_models
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 64)
    cfg = write_cfg(tmp, _every_method_config(method))
    whole = read_out(stream.run(stream.load(cfg), str(tmp / "whole"), progress=False, seed=1))
    monkeypatch.setattr(chunked, "MIN_BYTES", 600)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 200)
    draws = []
    drawer = "della_masks" if method == "della" else "random_masks"
    real = getattr(kernels, drawer)
    monkeypatch.setattr(kernels, drawer, lambda *a, **k: draws.append(a[0].shape) or real(*a, **k))
    counts, budget_in_use = {}, chunked.MASK_BUDGET
    for budget in (budget_in_use, 0):
        monkeypatch.setattr(chunked, "MASK_BUDGET", budget)
        draws.clear()
        out = read_out(stream.run(stream.load(cfg), str(tmp / f"blocks{budget}"), progress=False, seed=1))
        counts[budget] = len(draws)
        for name in whole:
            np.testing.assert_array_equal(out[name], whole[name], err_msg=f"{name}, budget {budget}")
    n_blocks = sum(len(chunked.spans(rows, chunked.block_rows((rows, 24), 2))) for rows in (40, 40, 24, 24, 24, 48, 48, 48))
    assert counts[0] - counts[budget_in_use] == n_blocks  # every block drawn once more without the budget


@pytest.mark.parametrize("blocks", [False, True])
def test_cli_global_trim_equals_the_api_s(wide_models, monkeypatch, blocks):
    """``trim: global`` in the CLI: one threshold per model over every tensor (ties
    broken in tensor-name order, as the API's dict leaves are), then the merge."""
    from research.merging.stream import chunked
    tmp, base, fts = wide_models
    if blocks:
        monkeypatch.setattr(chunked, "CHUNK_BYTES", 200)
    text = TIES.replace("parameters: {lambda: 0.8}", "parameters: {lambda: 0.8, trim: global}")
    got = read_out(stream.run(stream.load(write_cfg(tmp, text)), str(tmp / "out"), progress=False))
    expect = merging.merge("ties", fts, base=base, weight=[1.0, 0.5, 1.0], density=0.3, lam=0.8, trim="global")
    per_tensor = merging.merge("ties", fts, base=base, weight=[1.0, 0.5, 1.0], density=0.3, lam=0.8)
    assert any((np.asarray(per_tensor[n]) != got[n]).any() for n in base)  # a different merge from trim: tensor
    for name in base:
        np.testing.assert_array_equal(got[name], np.asarray(expect[name]), err_msg=name)


def test_cli_global_trim_refuses_a_density_that_varies_by_tensor(models):
    tmp, *_ = models
    text = TIES.replace("parameters: {lambda: 0.8}", "parameters: {lambda: 0.8, trim: global}").replace(
        "{weight: 1.0, density: 0.3}", "{weight: 1.0, density: [0.3, 0.5]}")
    _err(tmp, text, "trim: global .* density cannot vary by tensor")
    _err(tmp, text, "trim: global .* density cannot vary by tensor", dry_run=True)


def _set_entries(ckpt, name, values):
    """Write ``values`` (``{(row, col): value}``) into tensor ``name`` of checkpoint dir ``ckpt``."""
    index = json.load(open(os.path.join(ckpt, "model.safetensors.index.json")))["weight_map"]
    path = os.path.join(ckpt, index[name])
    tensors = load_file(path)
    x = tensors[name].astype(np.float32)
    for at, v in values.items():
        x[at] = v
    tensors[name] = x.astype(tensors[name].dtype)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "dare_ties", "della"])
def test_tiny_inputs_merged_in_row_blocks_give_the_tensors_of_whole_tensor_merges(wide_models, monkeypatch, method):
    """Magnitudes below 2**-32 in the embeddings (a subnormal base entry no model
    changes, and a subnormal entry over a zero base in a model that keeps every
    entry, which no threshold counts) are merged again by XLA in the block
    that holds them, as in the whole-tensor merge."""
    from research.merging import sparsify
    from research.merging.cpu import leaf as cpu_leaf
    from research.merging.stream import chunked
    tmp, base, _ = wide_models
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 64)  # draw blocks of 2 rows, which row blocks align to
    name = "model.embed_tokens.weight"
    _set_entries(tmp / "base", name, {(3, 5): 1e-39, (30, 2): 0.0})
    for i in range(3):
        _set_entries(tmp / f"ft{i}", name, {(3, 5): 1e-39} | ({(30, 2): 1e-39} if i == 0 else {}))
    density = "0.5\n  epsilon: 0.1" if method == "della" else "0.3"
    text = _every_method_config(method, density).replace("  - model: ft0\n", "  - model: ft0\n    parameters: {density: 1.0}\n")
    cfg = write_cfg(tmp, text)
    patched, real = [], cpu_leaf.patch_tiny
    monkeypatch.setattr(cpu_leaf, "patch_tiny", lambda leaf, b, ms, flat, *a: patched.append(len(flat)) or real(leaf, b, ms, flat, *a))
    whole = read_out(stream.run(stream.load(cfg), str(tmp / "whole"), progress=False, seed=1))
    assert patched == [2]  # the embeddings: both entries
    monkeypatch.setattr(chunked, "MIN_BYTES", 600)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 200)  # blocks of 4 rows of 24
    patched.clear()
    blocks = read_out(stream.run(stream.load(cfg), str(tmp / "blocks"), progress=False, seed=1))
    assert patched == [1, 1]  # the blocks of rows 0-3 and 28-31
    for name in whole:
        np.testing.assert_array_equal(blocks[name].view(np.uint16), whole[name].view(np.uint16), err_msg=name)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_nan_in_a_model_that_keeps_every_entry_fails_in_row_blocks_too(wide_models, monkeypatch, method):
    """A model of density 1 has no threshold to count, but the counting pass of each
    block screens it all the same."""
    from research.merging.stream import chunked
    tmp, *_ = wide_models
    _set_entries(tmp / "ft0", "model.embed_tokens.weight", {(30, 2): np.nan})
    text = _every_method_config(method).replace("  - model: ft0\n", "  - model: ft0\n    parameters: {density: 1.0}\n")
    monkeypatch.setattr(chunked, "MIN_BYTES", 600)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 200)
    with pytest.raises(stream.MergeFailed, match=r"tensor model.embed_tokens.weight: .*model 0 .*NaN or Inf"):
        stream.run(stream.load(write_cfg(tmp, text)), str(tmp / "out"), progress=False)
    assert not os.path.exists(tmp / "out")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "linear"])
def test_merges_run_by_the_numba_kernels_map_their_inputs_and_give_the_same_tensors(wide_models, monkeypatch, method):
    """The methods with a sparsifier take their inputs mapped from the page cache
    (every tensor here, whole or in row blocks, with ``MAP_MIN`` lowered), the
    others, and every merge run with ``--no-map``, ``pread`` them; mapping changes
    no bit of the output."""
    from research import safetensors_io
    from research.merging.__main__ import main as merge_main
    from research.merging.stream import chunked
    from test_safetensors_io import _mapped
    tmp, *_ = wide_models
    monkeypatch.setattr(safetensors_io, "MAP_MIN", 1)
    monkeypatch.setattr(chunked, "MIN_BYTES", 1000)  # embeddings, lm_head, q and up in blocks
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 200)
    mapped, real = [], safetensors_io.SafetensorsFile.view

    def view(self, name, rows=None, *, flat=False):
        a = real(self, name, rows, flat=flat)
        mapped.append((name, _mapped(a)))
        return a

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "view", view)
    cfg = stream.load(write_cfg(tmp, _every_method_config(method)))
    got = read_out(stream.run(cfg, str(tmp / "mapped"), progress=False))
    if method == "linear":
        assert not mapped
    else:
        assert all(ok for _, ok in mapped) and len({n for n, _ in mapped}) == len(got)
    n_mapped = len(mapped)
    assert merge_main([cfg.source, str(tmp / "read"), "--no-map", "--no-progress"]) == 0
    assert len(mapped) == n_mapped
    expect = read_out(str(tmp / "read"))
    for name in expect:
        np.testing.assert_array_equal(got[name].view(np.uint16), expect[name].view(np.uint16), err_msg=name)


@pytest.mark.parametrize("method", merging.METHODS)
def test_bf16_checkpoints_merged_under_dtype_float32_are_read_as_bf16_and_give_the_float32_merge(
        wide_models, monkeypatch, method):
    """Every method computes in float32 from bf16 inputs as from their float32 casts,
    so under ``dtype: float32`` the CLI hands the merge the bf16 tensors as they
    are (half the bytes); its output is the merge of the float32 casts bit for
    bit, for the tensors merged whole and those merged in row blocks."""
    from research.merging import sparsify
    from research.merging.stream import chunked, engine
    tmp, base, fts = wide_models
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 64)
    monkeypatch.setattr(chunked, "MIN_BYTES", 1200)  # float32: embeddings, lm_head, q and up in blocks
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 400)
    cfg = write_cfg(tmp, _every_method_config(method, "0.3") + "dtype: float32\n")
    seen, blocked = {}, set()  # run: {tensor: the dtypes its inputs reach the merge in}
    real_blocks, real_tensor = chunked.merge_blocks, engine._merge_tensor

    def merge_blocks(m, opts, t, *args):
        base_rows, model_rows = t.read((0, 1))
        seen[run][t.name] = {str(a.dtype) for a in [base_rows, *model_rows] if a is not None}  # linear: no base
        blocked.add(t.name)
        return real_blocks(m, opts, t, *args)

    def merge_tensor(plan, mc, name, work, *args):
        seen[run][name] = {str(a.dtype) for a in work}
        return real_tensor(plan, mc, name, work, *args)

    monkeypatch.setattr(chunked, "merge_blocks", merge_blocks)
    monkeypatch.setattr(engine, "_merge_tensor", merge_tensor)
    out = {}
    for run in ("read as bf16", "cast"):
        if run == "cast":
            monkeypatch.setattr(engine.Plan, "widened", lambda self, name: False)
        seen[run] = {}
        out[run] = read_out(stream.run(stream.load(cfg), str(tmp / run), progress=False, seed=1))
    assert all(d == {"bfloat16"} for d in seen["read as bf16"].values())
    assert all(d == {"float32"} for d in seen["cast"].values())
    assert set(seen["cast"]) == set(base) and "lm_head.weight" in blocked and "model.norm.weight" not in blocked
    for name in base:
        assert out["read as bf16"][name].dtype == np.float32
        np.testing.assert_array_equal(out["read as bf16"][name], out["cast"][name], err_msg=name)
