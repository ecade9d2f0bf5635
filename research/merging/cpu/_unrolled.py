"""numba kernels written out per number of models: the TIES/breadcrumbs merge
pass, DARE's merge pass (masks drawn inline) and the fused top-k counting pass.

Their loops run over columns with every per-model value (threshold, weight,
trimmed delta, count) in a register, so each is written out for its number
of models, unrolled: a loop over the models inside keeps numba from
vectorising.  Each variant is a small generated module, written to a cache
directory and imported from there, so that numba caches its machine code
like any other module's.  A module's name carries a hash of this file and
of ``_loops`` (whose helpers it calls), so editing either makes new ones.
Their outer loops are row-parallel, or plain loops where ``_loops.PARALLEL``
is off (``RESEARCH_MERGE_CPU=serial``), in modules of their own.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path

from research.merging.cpu import _loops

_HELPERS = ("_count32, _decode, _encode, _fma, _kept, _kept_below, _low_bits, _low_start, _sign, _threefry_bits, "
            "_tiny_seen, _uniform01, _unpack_row")
_LOCK = threading.Lock()  # one thread writes and imports a module at a time


def _jit(parallel: bool) -> str:
    """The decorator of a generated kernel: row-parallel, or a plain loop
    (``_loops.PARALLEL``; the module's name then ends in ``_serial``)."""
    return f"@numba.njit(parallel={parallel}, nogil=True, cache=True)"


def merge_mode(consensus: int, normalize: bool, lam_is_one: bool, vote_raw: bool = False, has_top: bool = True,
               unit_weights: bool = False) -> int:
    """The options that shape the loop, as one integer; ``consensus``: 0 none,
    1 the sign of the summed votes, 2 the sign of their signs' sum;
    ``vote_raw``: votes are the unweighted deltas; ``has_top``: some model has
    a top cut (breadcrumbs); ``unit_weights``: every weight is 1 (``1 * x`` is
    ``x``, so the products are skipped)."""
    return consensus + 3 * normalize + 6 * lam_is_one + 12 * vote_raw + 24 * has_top + 48 * unit_weights


def _mix_lines(n: int, mode: int, pad: str) -> list[str]:
    """The loop body after each model's kept delta ``e<i>`` (float32) and the base
    element ``b``: ``consensus.disjoint_sum`` and ``task_vectors.mix``, into ``o[c]``.

    The sums run left to right, as ``consensus.disjoint_sum``'s do in XLA, and
    ``base + lam * mixed`` is one fused multiply-add, as XLA:CPU compiles it:
    the results are bit for bit XLA's.
    """
    consensus, normalize, lam_is_one = mode % 3, mode // 3 % 2, mode // 6 % 2
    vote_raw, unit_weights = mode // 12 % 2, mode // 48 % 2
    m = range(n)
    lines = [f"a{i} = e{i}" if unit_weights else f"a{i} = w{i} * e{i}" for i in m]
    if consensus == 0:
        lines.append("num = " + " + ".join(f"a{i}" for i in m))
        mixed = "num * inv_div" if normalize else "num"  # XLA divides by a scalar so: by its reciprocal
    else:
        # the votes: w_i * tau_i (a_i, as XLA multiplies it) or tau_i (times 1.0, exact)
        value = (lambda i: f"e{i}") if vote_raw else (lambda i: f"a{i}")
        vote = (lambda i: f"_sign({value(i)})") if consensus == 2 else value
        lines.append("s = " + " + ".join(vote(i) for i in m))
        lines.append("sgn = np.float32(1.0) if s >= 0 else np.float32(-1.0)  # a zero vote elects +")
        lines += [f"g{i} = a{i} * sgn > 0" for i in m]  # zeros (and NaN) never agree
        lines.append("num = " + " + ".join(f"(a{i} if g{i} else np.float32(0.0))" for i in m))
        if normalize:
            lines.append("den = " + " + ".join(f"(d{i} if g{i} else np.float32(0.0))" for i in m))
        mixed = "num / (den if den != 0 else np.float32(1.0))" if normalize else "num"
    if consensus == 0 and normalize and lam_is_one:  # XLA:CPU fuses base + num * inv_div too
        lines.append("o[c] = _encode(_fma(num, inv_div, b), o)")
        return [pad + line for line in lines]
    lines.append(f"mixed = {mixed}")
    lines.append("o[c] = _encode(b + mixed, o)" if lam_is_one else "o[c] = _encode(_fma(lam, mixed, b), o)")
    return [pad + line for line in lines]


def _span_source(n: int, mode: int) -> str:
    """``span``: columns ``lo:hi`` of row ``r``, thresholds ``kt``/``tt`` per model."""
    has_top = mode // 24 % 2
    m = range(n)
    lines = ["@numba.njit(nogil=True, cache=True)",
             "def span(base, fts, r, lo, hi, kt, tt, w, dw, inv_div, lam, out):",
             "    bt = base[r, lo:hi]", "    o = out[r, lo:hi]"]
    lines += [f"    x{i} = fts[{i}][r, lo:hi]; k{i} = kt[{i}]; t{i} = tt[{i}]; w{i} = w[{i}]; d{i} = dw[{i}]"
              for i in m]
    lines += ["    for c in range(hi - lo):", "        b = _decode(bt[c])"]
    if has_top:
        lines += [f"        e{i} = _kept_below(x{i}[c], b, k{i}, t{i})" for i in m]
    else:
        lines += [f"        e{i} = _kept(x{i}[c], b, k{i})" for i in m]
    return "\n".join(lines + _mix_lines(n, mode, " " * 8)) + "\n"


def _random_source(n: int, mode: int, drawn: bool, parallel: bool) -> str:
    """``random_merge``: DARE's merge pass, row by row.  ``drawn``: each keep mask is
    drawn inline (``_loops.bernoulli_blocks``'s bits), else read from ``bits`` (packed
    as ``_loops._pack_row`` packs them, ``[n, rows, ceil(cols / 8)]``); a
    kept delta is multiplied by ``q[i]`` (the inverse of the keep probability,
    as XLA divides by a scalar, or the L1 rescale's factor).  ``flags[r]`` gets 1 where row ``r``'s
    inputs hold a non-zero magnitude below 2**-32, 2 where a difference is
    NaN/Inf (the caller then merges by the XLA program, or raises)."""
    m = range(n)
    lines = [_jit(parallel), "def random_merge(base, fts, keys, block_rows, row0, p, bits, q, w, dw, inv_div, lam, out, flags):",
             "    rows, cols = base.shape",
             "    for r in numba.prange(rows):",
             "        bt = base[r]", "        o = out[r]",
             "        blk = (r + row0) // block_rows", "        start = (r + row0 - blk * block_rows) * cols",
             "        low = _low_start(bt)", "        top = np.uint32(0)"]
    for i in m:
        lines.append(f"        x{i} = fts[{i}][r]; q{i} = q[{i}]; w{i} = w[{i}]; d{i} = dw[{i}]")
        lines.append(f"        ka{i} = np.uint32(keys[{i}, blk, 0]); kb{i} = np.uint32(keys[{i}, blk, 1]); p{i} = p[{i}]"
                     if drawn else f"        mk{i} = np.empty(cols, np.bool_); _unpack_row(bits[{i}, r], mk{i})")
    lines += ["        for c in range(cols):", "            b = _decode(bt[c])", "            low = min(low, _low_bits(bt[c]))",
              "            n = np.uint32(start + c)"]
    for i in m:
        lines += [f"            t{i} = _decode(x{i}[c]) - b",
                  f"            low = min(low, _low_bits(x{i}[c]))",
                  f"            top = max(top, np.float32(abs(t{i})).view(np.uint32))"]
        lines.append(f"            e{i} = t{i} * q{i} if _uniform01(_threefry_bits(ka{i}, kb{i}, n)) < p{i} else np.float32(0.0)"
                     if drawn else f"            e{i} = t{i} * q{i} if mk{i}[c] else np.float32(0.0)")
    lines += _mix_lines(n, mode, " " * 12)
    lines += ["        flags[r] = np.uint8(_tiny_seen(low, bt)) + np.uint8(2) * np.uint8(top >= np.uint32(0x7F800000))"]
    return "\n".join(lines) + "\n"


_DRIVER = '''
def cut_merge(base, fts, keep_v, keep_ge, keep_r, keep_c, top_v, top_ge, top_r, top_c, w, div_w,
              inv_div, lam, chunks, out):
    rows, cols = base.shape
    n = len(fts)
    for ch in numba.prange(chunks):
        kt = np.empty(n, np.float32)
        tt = np.empty(n, np.float32)
        for r in range(ch * rows // chunks, (ch + 1) * rows // chunks):
            lo = np.int64(0)  # not the literal 0: numba would compile span for that type too
            while lo < cols:
                hi = cols  # split the row at the next tie position in it
                for i in range(n):
                    if keep_r[i] == r and lo < keep_c[i] < hi:
                        hi = keep_c[i]
                    if top_r[i] == r and lo < top_c[i] < hi:
                        hi = top_c[i]
                for i in range(n):
                    kt[i] = keep_ge[i] if r < keep_r[i] or (r == keep_r[i] and lo < keep_c[i]) else keep_v[i]
                    tt[i] = top_ge[i] if r < top_r[i] or (r == top_r[i] and lo < top_c[i]) else top_v[i]
                span(base, fts, r, lo, hi, kt, tt, w, div_w, inv_div, lam, out)
                lo = hi
'''


def _cut_source(n: int, mode: int, parallel: bool) -> str:
    """``cut_merge``: rows (in chunks, one per thread task) split at the cuts' tie
    positions, each span merged by ``span``."""
    return _span_source(n, mode) + "\n" + _jit(parallel) + _DRIVER


def _probe_source(probe_model: tuple[int, ...], parallel: bool) -> str:
    """``probe_counts``: ``_loops.probe_counts_flushed`` without the flushes, each
    model's ``|ft - base|`` computed once for all its probes.  Per row, ``hazard``
    says whether the inputs hold a non-zero magnitude below 2**-32 (a min over
    their bits) and ``bad`` whether some ``d`` is NaN/Inf (a max over its bits):
    the caller counts again with the flushing kernel where either could matter.
    The counts run in 32-bit lanes (``_count32``): rows of at most
    ``2**31 - 1`` entries, which the caller ensures."""
    models = sorted(set(probe_model))
    lines = [_jit(parallel), "def probe_counts(base, fts, t_gt, t_ge, gt, ge, bad, hazard):",
             "    for r in numba.prange(base.shape[0]):",
             "        bt = base[r]",
             "        low = _low_start(bt)",
             "        top = np.uint32(0)"]
    lines += [f"        x{i} = fts[{i}][r]" for i in models]
    lines += [f"        g{p} = t_gt[{p}]; e{p} = t_ge[{p}]; ng{p} = np.int32(0); ne{p} = np.int32(0)"
              for p in range(len(probe_model))]
    lines += ["        for c in range(len(bt)):", "            b = _decode(bt[c])", "            low = min(low, _low_bits(bt[c]))"]
    for i in models:
        lines += [f"            d{i} = abs(_decode(x{i}[c]) - b)", f"            low = min(low, _low_bits(x{i}[c]))",
                  f"            top = max(top, np.float32(d{i}).view(np.uint32))"]
    for p, i in enumerate(probe_model):
        lines += [f"            ng{p} = _count32(ng{p}, d{i} > g{p})", f"            ne{p} = _count32(ne{p}, d{i} > e{p})"]
    lines += [f"        gt[{p}, r] = ng{p}; ge[{p}, r] = ne{p}" for p in range(len(probe_model))]
    lines += ["        bad[r] = top >= np.uint32(0x7F800000)", "        hazard[r] = _tiny_seen(low, bt)"]
    return "\n".join(lines) + "\n"


def _module(name: str, body: str) -> str:
    return (f'"""Generated by research.merging.cpu._unrolled ({name}): do not edit."""\n'
            "import numba\nimport numpy as np\n\n"
            f"from research.merging.cpu._loops import {_HELPERS}\n\n\n" + body)


@functools.cache
def _version() -> str:
    here = Path(__file__).parent
    text = b"".join((here / f).read_bytes() for f in ("_unrolled.py", "_loops.py"))
    return hashlib.sha256(text).hexdigest()[:12]


def _cache_dir() -> Path:
    """Where generated modules live: ``$RESEARCH_KERNEL_DIR``, else the user's cache
    directory, else a per-user temporary one."""
    chosen = os.environ.get("RESEARCH_KERNEL_DIR")
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "research" / "kernels"
    for d in ([Path(chosen)] if chosen else []) + [home, Path(tempfile.gettempdir()) / f"research-kernels-{os.getuid()}"]:
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise OSError("no writable directory for the generated merge kernels (set RESEARCH_KERNEL_DIR)")


def _load(name: str, body: str):
    """Import generated module ``name`` from the cache directory (written,
    atomically, when missing or different)."""
    name = f"research_{name}_{_version()}"
    with _LOCK:
        if name in sys.modules:
            return sys.modules[name]
        path = _cache_dir() / f"{name}.py"
        source = _module(name, body)
        if not path.exists() or path.read_text() != source:
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(source)
            os.replace(tmp, path)  # other processes see the whole file or none
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # numba's cache re-imports it by name
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module


def cut_merge(n: int, mode: int):
    """The merge pass of ``n`` models in ``mode`` (``merge_mode``)."""
    return _kernel(f"cut_merge_n{n}_m{mode}", _cut_source, n, mode).cut_merge


def random_merge(n: int, mode: int, drawn: bool):
    """DARE's merge pass of ``n`` models in ``mode`` (``merge_mode``; no top cuts),
    masks drawn inline or read (``drawn``)."""
    name = f"random_merge_n{n}_m{mode}_{'drawn' if drawn else 'read'}"
    return _kernel(name, _random_source, n, mode, drawn).random_merge


def probe_counts(probe_model: tuple[int, ...]):
    """The unflushed counting pass of probes on models ``probe_model``."""
    return _kernel("probe_counts_" + "_".join(map(str, probe_model)), _probe_source, probe_model).probe_counts


def _kernel(name: str, source, *args):
    """Generated module ``name``, ``source(*args, parallel)``, in the mode
    ``_loops.PARALLEL`` says now."""
    return _kernel_module(name, source, args, _loops.PARALLEL)


@functools.cache
def _kernel_module(name: str, source, args: tuple, parallel: bool):
    return _load(name if parallel else name + "_serial", source(*args, parallel))
