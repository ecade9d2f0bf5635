"""Attention over packed rows: causal AND same segment AND not padding, on every backend.

    out_btnh = attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, implementation="blockwise")

Shapes: ``q`` is ``[B, T, N, H]``, ``k``/``v`` are ``[B, T, K, H]`` with
``N % K == 0`` (grouped-query attention), ``segment_ids`` is ``[B, T]`` int
with 0 for padding.  Token i attends to token j when ``j <= i`` and
``segment_ids[i] == segment_ids[j]`` (padding attends to padding, so every row
has at least one key and nothing is NaN).  ``segment_mask=False`` drops the
same-segment condition (real tokens still never attend to padding): the
cross-task contamination ablation.

Backends (``implementation=``; ``None`` picks by platform: ``blockwise`` on
CPU, ``pallas_gpu`` on GPU, ``splash`` on TPU):

``xla``
    A dense ``[B, 1, T, T]`` boolean mask through
    ``jax.nn.dot_product_attention``.  The reference; O(T^2) memory.
``blockwise``
    Pure JAX, query/key blocks with an online softmax (a custom VJP with a
    FlashAttention-2 style backward).  Packed segment ids are contiguous
    runs, so the keys a query block needs form one contiguous range of key
    blocks, from the start of its first segment to the diagonal; only those
    block pairs are computed.  A 4096-row of forty 100-token samples needs
    about 1/40 of the dense work, and memory is O(T * block).  Requires
    segment ids in contiguous runs, as ``research.data.packing`` writes them
    (with ``segment_mask=False`` every block pair on or below the diagonal is
    computed).  The CPU path; on GPUs use ``pallas_gpu``
    (``docs/performance.md`` has the figures).
``pallas_gpu``
    ``jax.experimental.pallas.ops.gpu.attention.mha`` with ``segment_ids``
    (key/value heads are repeated for GQA).  Off GPU it runs in Pallas
    interpret mode, which is how the test suite checks it; on an H200
    (``experiments/gpu_check.py``) its outputs and gradients match the float32
    reference to bf16 precision.
``splash``
    TPU splash attention (``make_splash_mha`` with a causal ``MultiHeadMask``
    and ``SegmentIds``), vmapped over the batch.  Off TPU it runs in
    interpret mode.
``cudnn``
    cuDNN's fused attention in its packed ("ragged") layout
    (``q_offsets``/``q_seqlen`` of ``jax._src.cudnn.fused_attention_stablehlo``),
    segments turned into offsets (room for ``max_segments`` per row, default
    one per token).  GPU only, bf16/fp16 (float32 inputs are cast).  Checked on
    an H200 with ``experiments/gpu_check.py``: outputs and gradients match the
    reference once padding, which cuDNN leaves unwritten, is zeroed.  Not a
    default: it is slower than dense ``xla`` there (``docs/performance.md``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("xla", "blockwise", "pallas_gpu", "splash", "cudnn")


def default_implementation() -> str:
    platform = jax.devices()[0].platform
    return {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "splash"}.get(platform, "blockwise")


def allowed(seg_q, seg_k, pos_q, pos_k, segment_mask: bool = True):
    """Boolean ``[..., Tq, Tk]``: who may attend to whom (shared by every backend)."""
    causal = pos_q[..., :, None] >= pos_k[..., None, :]
    sq, sk = seg_q[..., :, None], seg_k[..., None, :]
    if segment_mask:
        return causal & (sq == sk)
    return causal & ((sk != 0) | (sq == 0))


def attention(q, k, v, segment_ids, *, implementation: str | None = None, segment_mask: bool = True,
              block_size: int = 128, max_segments: int | None = None, scale: float | None = None):
    impl = implementation or default_implementation()
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose from {IMPLEMENTATIONS}")
    B, T, N, H = q.shape
    K = k.shape[2]
    if N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of key/value heads ({K})")
    scale = H**-0.5 if scale is None else scale
    segment_ids = jnp.asarray(segment_ids)  # a host (numpy) batch works eagerly too
    if impl == "xla":
        return xla_attention(q, k, v, segment_ids, segment_mask=segment_mask, scale=scale)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, segment_ids, segment_mask=segment_mask, block_size=block_size, scale=scale)
    if not segment_mask:
        raise ValueError(f"segment_mask=False (the contamination ablation) is supported by 'xla' and 'blockwise', not {impl!r}")
    if impl == "pallas_gpu":
        return pallas_gpu_attention(q, k, v, segment_ids, scale=scale)
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids, scale=scale)
    return cudnn_attention(q, k, v, segment_ids, scale=scale, max_segments=max_segments)


# --- xla (dense reference) -------------------------------------------------------


def xla_attention(q, k, v, segment_ids, *, segment_mask=True, scale=None):
    T = q.shape[1]
    pos = jnp.arange(T)
    mask = allowed(segment_ids, segment_ids, pos, pos, segment_mask)[:, None]  # [B, 1, T, T]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


# --- blockwise (pure JAX, block-sparse) ---------------------------------------------


def _key_block_start(segment_ids, bs: int, segment_mask: bool):
    """Per row and query block: the first key block any of its queries needs."""
    B, T = segment_ids.shape
    nb = T // bs
    if not segment_mask:
        return jnp.zeros((B, nb), jnp.int32)
    t = jnp.arange(T)
    first = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    run_start = lax.cummax(jnp.where(first, t, 0), axis=1)  # start of each token's run
    return (run_start[:, ::bs] // bs).astype(jnp.int32)  # runs are non-decreasing in t


def _scores(qi, kj, seg_i, seg_j, i, j, bs, scale, segment_mask):
    """Masked scores of query block i against key block j: [K, G, bs, bs]."""
    s = jnp.einsum("qkgh,skh->kgqs", qi, kj) * scale
    pos = jnp.arange(bs)
    ok = allowed(seg_i, seg_j, i * bs + pos, j * bs + pos, segment_mask)
    return jnp.where(ok, s, -jnp.inf)


def _fwd_impl(q, k, v, seg, bs, scale, segment_mask):
    B, T, K, G, H = q.shape
    nb = T // bs
    lo = _key_block_start(seg, bs, segment_mask)

    def one(bi):
        b, i = bi // nb, bi % nb
        qi = lax.dynamic_slice_in_dim(q[b], i * bs, bs)
        seg_i = lax.dynamic_slice_in_dim(seg[b], i * bs, bs)

        def body(j, carry):
            m, l, acc = carry
            kj = lax.dynamic_slice_in_dim(k[b], j * bs, bs)
            vj = lax.dynamic_slice_in_dim(v[b], j * bs, bs)
            seg_j = lax.dynamic_slice_in_dim(seg[b], j * bs, bs)
            s = _scores(qi, kj, seg_i, seg_j, i, j, bs, scale, segment_mask)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + jnp.einsum("kgqs,skh->kgqh", p, vj)
            return m_new, l, acc

        init = (jnp.full((K, G, bs), -jnp.inf), jnp.zeros((K, G, bs)), jnp.zeros((K, G, bs, H)))
        m, l, acc = lax.fori_loop(lo[b, i], i + 1, body, init)
        o = acc / l[..., None]
        return jnp.transpose(o, (2, 0, 1, 3)), jnp.transpose(m + jnp.log(l), (2, 0, 1))

    o, lse = lax.map(one, jnp.arange(B * nb))
    return o.reshape(B, T, K, G, H), lse.reshape(B, T, K, G)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blockwise(q, k, v, seg, bs, scale, segment_mask):
    return _fwd_impl(q, k, v, seg, bs, scale, segment_mask)[0]


def _blockwise_fwd(q, k, v, seg, bs, scale, segment_mask):
    o, lse = _fwd_impl(q, k, v, seg, bs, scale, segment_mask)
    return o, (q, k, v, seg, o, lse)


def _blockwise_bwd(bs, scale, segment_mask, res, do):
    q, k, v, seg, o, lse = res
    B, T, K, G, H = q.shape
    nb = T // bs
    lo = _key_block_start(seg, bs, segment_mask)
    # the last query block that needs key block j: lo is non-decreasing in i
    hi = jax.vmap(lambda l: jnp.searchsorted(l, jnp.arange(nb), side="right") - 1)(lo)
    delta = jnp.einsum("btkgh,btkgh->btkg", do, o)

    def blk(x, b, i):
        return lax.dynamic_slice_in_dim(x[b], i * bs, bs)

    def probs(b, i, j):
        s = _scores(blk(q, b, i), blk(k, b, j), blk(seg, b, i), blk(seg, b, j), i, j, bs, scale, segment_mask)
        return jnp.exp(s - jnp.transpose(blk(lse, b, i), (1, 2, 0))[..., None])  # [K, G, bs_q, bs_k]

    def ds_of(b, i, j, p):
        dp = jnp.einsum("qkgh,skh->kgqs", blk(do, b, i), blk(v, b, j))
        return p * (dp - jnp.transpose(blk(delta, b, i), (1, 2, 0))[..., None])

    def dq_one(bi):
        b, i = bi // nb, bi % nb

        def body(j, acc):
            ds = ds_of(b, i, j, probs(b, i, j))
            return acc + jnp.einsum("kgqs,skh->qkgh", ds, blk(k, b, j)) * scale

        return lax.fori_loop(lo[b, i], i + 1, body, jnp.zeros((bs, K, G, H)))

    def dkv_one(bj):
        b, j = bj // nb, bj % nb

        def body(i, carry):
            dk, dv = carry
            p = probs(b, i, j)
            dv = dv + jnp.einsum("kgqs,qkgh->skh", p, blk(do, b, i))
            dk = dk + jnp.einsum("kgqs,qkgh->skh", ds_of(b, i, j, p), blk(q, b, i)) * scale
            return dk, dv

        return lax.fori_loop(j, hi[b, j] + 1, body, (jnp.zeros((bs, K, H)), jnp.zeros((bs, K, H))))

    dq = lax.map(dq_one, jnp.arange(B * nb)).reshape(B, T, K, G, H)
    dk, dv = lax.map(dkv_one, jnp.arange(B * nb))
    return dq, dk.reshape(B, T, K, H), dv.reshape(B, T, K, H), None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q, k, v, segment_ids, *, segment_mask=True, block_size=128, scale=None):
    B, T, N, H = q.shape
    K = k.shape[2]
    scale = H**-0.5 if scale is None else scale
    segment_ids = jnp.asarray(segment_ids)
    bs = min(block_size, T)
    pad = (-T) % bs
    dtype = q.dtype
    f32 = lambda x: x.astype(jnp.float32)
    if pad:  # padded keys/queries get segment 0 and sit after every real token
        padder = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, segment_ids = padder(q), padder(k), padder(v), padder(segment_ids)
    qg = f32(q).reshape(B, T + pad, K, N // K, H)
    o = _blockwise(qg, f32(k), f32(v), segment_ids.astype(jnp.int32), bs, float(scale), bool(segment_mask))
    return o.reshape(B, T + pad, N, H)[:, :T].astype(dtype)


# --- pallas (GPU), splash (TPU), cudnn -------------------------------------------------


def _repeat_kv(k, n_heads):
    return jnp.repeat(k, n_heads // k.shape[2], axis=2)


def pallas_gpu_attention(q, k, v, segment_ids, *, scale, block_q: int = 64, block_k: int = 64):
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    N = q.shape[2]
    interpret = jax.devices()[0].platform not in ("gpu", "cuda")
    T = q.shape[1]
    bq, bk = min(block_q, T), min(block_k, T)
    sizes = pallas_attention.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bq, block_kv_dkv=bk,
                                        block_q_dq=bq, block_kv_dq=bk)
    return pallas_attention.mha(q, _repeat_kv(k, N), _repeat_kv(v, N), segment_ids.astype(jnp.int32),
                                sm_scale=scale, causal=True, block_sizes=sizes, interpret=interpret)


def splash_attention(q, k, v, segment_ids, *, scale):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, T, N, H = q.shape
    interpret = jax.devices()[0].platform != "tpu"
    mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(N)])
    blocks = min(128, T)
    sizes = sk.BlockSizes(block_q=blocks, block_kv=blocks, block_kv_compute=blocks, block_q_dkv=blocks,
                          block_kv_dkv=blocks, block_kv_dkv_compute=blocks, block_q_dq=blocks, block_kv_dq=blocks)
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    kn, vn = _repeat_kv(k, N), _repeat_kv(v, N)

    def one(qb, kb, vb, sb):  # splash takes [N, T, H] per example
        ids = sk.SegmentIds(q=sb, kv=sb)
        return kernel((qb * scale).transpose(1, 0, 2), kb.transpose(1, 0, 2), vb.transpose(1, 0, 2), segment_ids=ids)

    out = jax.vmap(one)(q, kn, vn, segment_ids.astype(jnp.int32))
    return out.transpose(0, 2, 1, 3)


def segments_to_offsets(segment_ids, max_segments: int | None = None):
    """cuDNN's packed ("ragged") layout of rows of contiguous segments.

    Returns ``offsets [B, M+1]`` (the start of each segment in its row, -1 past
    the row's last segment) and ``seqlens [B, M]`` (their lengths, -1 past the
    last), M = ``max_segments`` (default: the row length, which always fits).
    Padding (id 0) belongs to no segment.  A row ``[1 1 1 2 2 0]`` gives
    offsets ``[0 3 -1 ...]`` and seqlens ``[3 2 -1 ...]``.  O(B * T); segments
    past the M-th in a row are dropped, so M must be at least the largest
    count of segments in a row.
    """
    B, T = segment_ids.shape
    M = T if max_segments is None else int(max_segments)
    seg = segment_ids.astype(jnp.int32)
    prev = jnp.pad(seg[:, :-1], ((0, 0), (1, 0)))
    start = (seg != prev) & (seg > 0)  # the first token of each segment
    k = jnp.cumsum(start, axis=1, dtype=jnp.int32) - 1  # the segment each token is in
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    offsets = jnp.full((B, M + 1), -1, jnp.int32).at[rows, jnp.where(start, k, M + 1)].set(pos, mode="drop")
    lens = jnp.zeros((B, M), jnp.int32).at[rows, jnp.where(seg > 0, k, M)].add(1, mode="drop")
    n_seg = start.sum(axis=1, keepdims=True)
    return offsets, jnp.where(jnp.arange(M) < n_seg, lens, -1)


def cudnn_attention(q, k, v, segment_ids, *, scale, max_segments: int | None = None):
    """cuDNN's fused attention over the packed segments (in bf16 when given float32).

    Padding belongs to no segment, so cuDNN writes neither its outputs nor its
    gradients: both are zeroed here (outputs by a select, gradients by zeroing
    the padding entries of q, k, v on the way in).
    """
    if jax.devices()[0].platform not in ("gpu", "cuda"):
        raise RuntimeError("the 'cudnn' attention backend needs an NVIDIA GPU; use 'blockwise' or 'xla' here")
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    dtype = q.dtype
    real = (segment_ids > 0)[:, :, None, None]
    low = lambda x: jnp.where(real, x, 0).astype(jnp.bfloat16 if x.dtype == jnp.float32 else x.dtype)
    offsets, lens = segments_to_offsets(segment_ids, max_segments)
    N = q.shape[2]
    out = cudnn.dot_product_attention(low(q), low(_repeat_kv(k, N)), low(_repeat_kv(v, N)), q_seqlen=lens,
                                      kv_seqlen=lens, q_offsets=offsets, kv_offsets=offsets, scale=scale,
                                      mask_type=cudnn.MaskType.CAUSAL)
    return jnp.where(real, out, 0).astype(dtype)
