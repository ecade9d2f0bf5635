"""Packing: the batch contract, every strategy, over-long policies, statistics."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from research.data import packing

EOS = 1


def _samples(lengths, seed=0, tasks=3):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        toks = rng.integers(2, 50, size=n).astype(np.int32)
        mask = (np.arange(n) >= n // 3).astype(np.float32)  # first third is the "prompt"
        out.append({"tokens": toks, "task_id": i % tasks, "loss_mask": mask})
    return out


def test_worked_example_from_the_docstring():
    samples = [
        {"tokens": [5, 6, 7], "task_id": 0},
        {"tokens": [8, 9], "task_id": 0},
        {"tokens": [3, 4, 4], "task_id": 1, "loss_mask": [0, 1, 1]},
    ]
    b = packing.pack(samples, seq_len=12, strategy="concat", eos_id=EOS)
    # concat keeps arrival order: A1, A2, B1
    np.testing.assert_array_equal(b["tokens"][0], [5, 6, 7, 1, 8, 9, 1, 3, 4, 4, 1, 0])
    np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 0])
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 0])
    np.testing.assert_array_equal(b["targets"][0], [6, 7, 1, 0, 9, 1, 0, 4, 4, 1, 0, 0])
    np.testing.assert_array_equal(b["loss_weights"][0], [1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(b["task_ids"][0], [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1])
    np.testing.assert_array_equal(b["sample_ids"][0], [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, -1])


lengths_st = st.lists(st.integers(1, 80), min_size=1, max_size=60)


def _check_contract(b, seq_len):
    seg, pos, tok, tgt, lw = (b[k] for k in ("segment_ids", "positions", "tokens", "targets", "loss_weights"))
    assert seg.shape[1] == seq_len
    for r in range(seg.shape[0]):
        row = seg[r]
        real = row[row > 0]
        # contiguous, 1-based, padding only at the end
        assert (np.diff(real) >= 0).all() and (np.diff(real) <= 1).all() and real[0] == 1
        assert (row[len(real) :] == 0).all()
        for s in np.unique(real):
            cols = np.flatnonzero(row == s)
            np.testing.assert_array_equal(pos[r, cols], np.arange(len(cols)))  # restart
            np.testing.assert_array_equal(tgt[r, cols[:-1]], tok[r, cols[1:]])  # same segment
            assert tgt[r, cols[-1]] == 0 and lw[r, cols[-1]] == 0  # never the next segment
        assert (lw[r][row == 0] == 0).all() and (b["task_ids"][r][row == 0] == -1).all()


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_st, seq_len=st.sampled_from([16, 33, 64]), strategy=st.sampled_from(packing.STRATEGIES))
def test_no_token_lost_or_duplicated_and_contract_holds(lengths, seq_len, strategy):
    samples = _samples(lengths)
    b = packing.pack(samples, seq_len, strategy, eos_id=EOS, overlong="split", buffer_size=7)
    _check_contract(b, seq_len)
    # multiset of (sample id, token) pairs: the inputs plus one EOS each
    got = sorted(zip(b["sample_ids"][b["segment_ids"] > 0].tolist(), b["tokens"][b["segment_ids"] > 0].tolist()))
    want = sorted((i, t) for i, s in enumerate(samples) for t in [*s["tokens"].tolist(), EOS])
    assert got == want
    assert (b["segment_ids"] > 0).sum(axis=1).max() <= seq_len
    # unpack gives the samples back exactly
    back = packing.unpack(b)
    assert len(back) == len(samples)
    for s, u in zip(samples, back):
        np.testing.assert_array_equal(u["tokens"], s["tokens"])
        assert u["task_id"] == s["task_id"]
        # exact except at the first token of each segment (sample or split piece),
        # which no position predicts
        starts = np.arange(0, len(s["tokens"]) + 1, seq_len)
        keep = np.ones(len(s["tokens"]), bool)
        keep[starts[starts < len(keep)]] = False
        np.testing.assert_array_equal(u["loss_mask"][keep], s["loss_mask"][keep])


def _ffd_reference(lengths, L):
    caps, bins = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for j, c in enumerate(caps):
            if c >= lengths[i]:
                caps[j] -= lengths[i]
                bins.append((i, j))
                break
        else:
            caps.append(L - lengths[i])
            bins.append((i, len(caps) - 1))
    return dict(bins), caps


def _bfd_reference(lengths, L):
    caps = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [(c, j) for j, c in enumerate(caps) if c >= lengths[i]]
        if fits:
            c, j = min(fits)
            caps[j] -= lengths[i]
        else:
            caps.append(L - lengths[i])
    return caps


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=200), L=st.sampled_from([50, 64, 100]))
def test_grouped_ffd_and_bfd_equal_item_by_item(lengths, L):
    ref, _ = _ffd_reference(lengths, L)
    got = packing.plan(lengths, L, "ffd")
    assert [got[i] for i in range(len(lengths))] == [ref[i] for i in range(len(lengths))]
    bfd = packing.plan(lengths, L, "bfd")
    loads = np.bincount(bfd, weights=lengths)
    assert loads.max() <= L
    assert sorted((L - loads).astype(int).tolist()) == sorted(_bfd_reference(lengths, L))


def _seed_mixture(n, seed=0):
    rng = np.random.default_rng(seed)
    short = rng.lognormal(np.log(100), 0.5, size=n)
    long = rng.lognormal(np.log(2000), 0.3, size=n)
    return np.clip(np.where(rng.random(n) < 0.7, short, long), 1, 4096).astype(np.int64)


def test_bfd_reaches_99_percent_on_the_seed_mixture():
    lengths = _seed_mixture(20_000)
    bins = packing.plan(lengths, 4096, "bfd")
    eff = lengths.sum() / ((bins.max() + 1) * 4096)
    assert eff >= 0.99, eff


def test_stream_is_close_to_the_lower_bound_with_bounded_buffer():
    lengths = _seed_mixture(30_000)
    bins = packing.plan_stream(lengths, 4096, buffer_size=2000)
    lower = -(-lengths.sum() // 4096)
    assert bins.max() + 1 <= lower * 1.02
    assert np.bincount(bins, weights=lengths).max() <= 4096


def test_stream_pack_yields_rows_online():
    samples = _samples([30, 5, 12, 40, 7, 3, 60, 2], seed=1)
    rows = list(packing.stream_pack(iter(samples), 64, buffer_size=3, eos_id=EOS))
    assert all(r["tokens"].shape == (1, 64) for r in rows)
    total = sum(int((r["segment_ids"] > 0).sum()) for r in rows)
    assert total == sum(len(s["tokens"]) + 1 for s in samples)


@pytest.mark.parametrize("policy", ["truncate", "drop", "split"])
def test_overlong_policies_are_counted(policy):
    samples = _samples([10, 100, 20])
    if policy == "drop":
        with pytest.warns(UserWarning, match="dropped 1 sample"):
            b = packing.pack(samples, 32, "bfd", overlong=policy, eos_id=EOS)
    else:
        b = packing.pack(samples, 32, "bfd", overlong=policy, eos_id=EOS)
    s = packing.stats(b)
    if policy == "truncate":
        assert s["overlong_truncated"] == 1 and s["overlong_tokens_dropped"] == 101 - 32
    elif policy == "drop":
        assert s["overlong_dropped"] == 1 and s["overlong_tokens_dropped"] == 101
        assert sorted(set(b["sample_ids"][b["sample_ids"] >= 0].tolist())) == [0, 2]
    else:
        assert s["overlong_split"] == 1
        assert set(b["piece_ids"][b["sample_ids"] == 1].tolist()) == {0, 1, 2, 3}


def test_bad_input_is_named():
    with pytest.raises(packing.PackingError, match="sample 1 is empty"):
        packing.pack([[3, 4], []], 16)
    with pytest.raises(packing.PackingError, match="sample 0 has 41 tokens.*overlong='drop'"):
        packing.pack([np.arange(2, 42)], 16, overlong="drop", strict_drop=True)
    with pytest.raises(packing.PackingError, match="unknown strategy"):
        packing.pack([[3]], 16, strategy="best")
    with pytest.raises(packing.PackingError, match="sample 0: loss_mask"):
        packing.pack([{"tokens": [3, 4], "loss_mask": [1]}], 16)


def test_stats_figures():
    b = packing.pack([np.full(7, 5), np.full(7, 5), np.full(15, 5)], 16, "bfd", eos_id=EOS)
    s = packing.stats(b)
    assert s["rows"] == 2 and s["lower_bound_rows"] == 2 and s["real_tokens"] == 32
    assert s["efficiency"] == 1.0 and s["segments_per_row"] == 1.5
    assert s["naive_rows"] == 3 and s["padding_saved_tokens"] == 3 * 16 - 32


@pytest.mark.parametrize("strategy", packing.STRATEGIES)
def test_no_samples_or_all_dropped_give_an_empty_batch(strategy):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in (packing.pack([], 16, strategy), packing.pack([[3] * 40], 16, strategy, overlong="drop")):
            assert batch["tokens"].shape == (0, 16) and batch["segment_ids"].dtype == np.int32
            assert packing.unpack(batch) == [] and packing.stats(batch)["rows"] == 0


@pytest.mark.parametrize("seq_len", [0, -1, 8.0, True])
def test_bad_seq_len_is_named(seq_len):
    with pytest.raises(packing.PackingError, match="seq_len"):
        packing.pack([[3, 4]], seq_len)


def test_token_ids_beyond_int32_are_an_error_not_a_wrap():
    with pytest.raises(packing.PackingError, match=r"sample 1: token id 1099511627783"):
        packing.pack([np.array([5]), np.array([2**40 + 7])], 16)
