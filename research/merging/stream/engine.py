"""Streaming merges of real checkpoints, tensor by tensor, with bounded memory.

Each output tensor is computed from the same tensor of every input (or, for
mergekit's ``slices:``, from the tensors ``slices.py`` maps it to).  One
thread reads the next tensor from the safetensors files while the current
one merges; another writes the previous one straight to its place in the
output shards, which are laid out up front.  Inputs of the merges that the
CPU backend's numba kernels run (``mapped_inputs``) are mapped from the page
cache (``TensorSource.view``), the others ``pread`` into aligned buffers that
``jax.device_put`` aliases.
Tensors above ``chunked.MIN_BYTES`` per model (at the dtype they merge in)
are read, merged and written in row blocks (``chunked.py``; each block is
read while the one before is merged), so peak memory is bounded by the
block size and the largest tensor below that size, not by the model's
largest tensor (for a tensor of 3 or more axes that ``chunked.block_shape``
keeps whole, by one leading row: an expert of a fused MoE tensor).
Output goes to ``OUT.tmp-<pid>-*`` under a lock on ``OUT`` and is renamed to
``OUT`` only when complete (``output.py``).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from research import merging
from research.merging import cpu, registry, sparsify, task_vectors
from research.merging.stream import chunked, expert_masks, metadata, slices, sources
from research.merging.stream import config as cfg_lib
from research.merging.stream.output import Output, OutputError
from research.merging.stream.sources import TensorSource, open_source
from research.safetensors_io import CheckpointError, ShardWriter, json_object, no_room

_GLOBAL_RENAME = {"lambda": "lam"}
_IGNORED = {"int8_mask"}  # mergekit memory options with no meaning here
_PREFETCH_BUDGET = 512 << 20  # bytes of input tensors in memory at once when overlapping reads


class MergeFailed(ValueError):
    pass


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.I)
    if not m:
        raise MergeFailed(f"--shard-size {text!r}: expected a size like 5GB or 500MB")
    mult = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def _is_float(d) -> bool:
    return np.issubdtype(d, np.floating) or d == jnp.bfloat16


@dataclasses.dataclass
class Plan:
    method: str
    base: TensorSource | None
    models: list  # a TensorSource per model; a sources.NameMap per input position of a slices merge
    scopes: dict  # tensor -> config.Scope: where its parameters are looked up
    names: list
    n_layers: int  # in the output
    vocab_rows: dict  # tensor -> common row count, where vocab sizes differ
    dtype: object = None  # the config's dtype, which float tensors are merged in; None: their own
    chat_template: str | None = None  # the output's, where the config sets one

    @property
    def ref(self):
        """The input whose names, shapes and dtypes the output takes: the base, else the first model."""
        return self.base or self.models[0]

    @property
    def sources(self) -> list:
        """The inputs: the base, where there is one, then the models."""
        return ([self.base] if self.base else []) + self.models

    def itemsize(self, name: str) -> int:
        """Bytes an entry of tensor ``name`` takes while it merges."""
        d = self.ref.dtypes[name]
        return np.dtype(self.dtype).itemsize if self.dtype is not None and _is_float(d) else d.itemsize

    def widened(self, name: str) -> bool:
        """Whether tensor ``name``, bf16 in every input, is merged under ``dtype: float32``.
        Every method computes in float32 from bf16 inputs (``tree.compute_dtype``)
        as from their float32 casts, every bf16 being a float32: the inputs are
        then read as they are, half the bytes, and widened as the merge computes."""
        return (self.dtype is not None and jnp.dtype(self.dtype) == jnp.float32
                and all(s.dtypes[name] == jnp.bfloat16 for s in self.sources))

    def input_itemsize(self, name: str) -> int:
        """Bytes an entry of an input of tensor ``name`` takes while it merges: its
        checkpoint's where ``widened``, else ``itemsize``."""
        return self.ref.dtypes[name].itemsize if self.widened(name) else self.itemsize(name)

    def bytes_read(self) -> int:
        return sum(s.nbytes(n) for s in self.sources for n in self.names)

    def bytes_written(self) -> int:
        return sum(self.ref.nbytes(n) for n in self.names)

    def merge_dtype(self, name: str):
        """The dtype tensor ``name``'s inputs are merged from: the config's ``dtype`` (not
        where ``widened``), else the checkpoint's."""
        own = self.ref.dtypes[name]
        return own if self.dtype is None or self.widened(name) or not _is_float(own) else jnp.dtype(self.dtype)

    def block_shape(self, name: str) -> tuple:
        """The shape whose leading rows tensor ``name`` is merged in blocks of (``chunked.block_shape``)."""
        shape, dtype = self.ref.shapes[name], self.merge_dtype(name)
        host_draws = ((self.method in chunked.DRAWN_FLAT_METHODS and chunked.draws_on_host(dtype))
                      or (self.method in chunked.STRIP_METHODS and chunked.strips_on_host(dtype)))
        return chunked.block_shape(shape, self.method, host_draws)

    def flat(self, name: str) -> bool:
        """Whether those blocks are rows of tensor ``name``'s ``[-1, shape[-1]]`` view."""
        return self.block_shape(name) != tuple(self.ref.shapes[name])

    def blocked(self, name: str) -> bool:
        """Whether tensor ``name`` is read, merged and written in row blocks (a float
        tensor above ``chunked.MIN_BYTES`` at the dtype it merges in)."""
        return _is_float(self.ref.dtypes[name]) and chunked.chunked(self.block_shape(name), self.itemsize(name))

    def held(self) -> dict:
        """Per tensor, the bytes in memory at once while it merges: its inputs (or two
        row blocks of them: the one merging and the one read ahead), float32 working
        copies, the output waiting for the disk, and DELLA's ranks and mask."""
        n_in = len(self.models) + (self.base is not None)
        della = getattr(task_vectors.RECIPES.get(self.method), "sparsify", None) == "della"
        out = {}
        for n in self.names:
            shape = self.block_shape(n)
            rows = chunked.block_rows(shape, self.itemsize(n), aligned=not self.flat(n))
            # entries in flight: a whole tensor, or one row block of a blocked one
            unit = min(rows, shape[0]) * int(np.prod(shape[1:])) if self.blocked(n) else int(np.prod(shape))
            in_bytes = n_in * unit * self.input_itemsize(n)
            # a blocked tensor: two blocks read; a whole one: the next tensor's inputs too, within the budget
            inputs = 2 * in_bytes if self.blocked(n) else max(in_bytes, min(2 * in_bytes, _PREFETCH_BUDGET))
            ranks = unit * (1 + (2 if sparsify.della_shape(self.ref.shapes[n])[1] <= 1 << 16 else 4))  # and mask
            if della and self.flat(n) and self.blocked(n):  # the masks of a 3-D tensor from strips of its experts
                own, item = self.ref.shapes[n], self.input_itemsize(n)
                p = check_tensor_params(self, n, "")
                if p["rescale"] and p["rescale_mode"] == "inverse":  # merged by strips, an expert's output at once
                    out[n] = expert_masks.inverse_held_bytes(own, n_in, item, self.itemsize(n), chunked.CHUNK_BYTES)
                    continue
                ranks = expert_masks.ExpertMasks.held_bytes(own, len(self.models), item, chunked.CHUNK_BYTES)
            out[n] = inputs + 2 * unit * 4 + unit * self.itemsize(n) + (ranks if della else 0)
        return out

    def in_flight(self) -> int:
        """Bytes of tensors in memory at once, at most, over the merge: the largest of
        ``held``, plus DARE's and DELLA's bit-packed masks kept between a tensor's passes."""
        masks = [int(np.prod(self.ref.shapes[n])) * len(self.models) // 8 for n in self.names if self.blocked(n)]
        kept = max([m for m in masks if m <= chunked.MASK_BUDGET], default=0)
        return max(self.held().values()) + (kept if self.method in merging.RANDOM_METHODS else 0)

    def process_bytes(self, resident: int | None = None) -> int:
        """Bytes of the merging process itself: ``resident`` (its resident memory before
        the first tensor; default: this process's now, ``resident_bytes``) plus the
        programs the merge compiles (``_PROGRAM_BYTES``; ``_KERNEL_BYTES`` more
        where the numba kernels run)."""
        resident = resident_bytes() if resident is None else resident
        return resident + _PROGRAM_BYTES + (_KERNEL_BYTES if cpu.ENABLED and self.method in MAPPED_METHODS else 0)

    def peak_estimate(self, resident: int | None = None) -> int:
        """The merge's expected peak resident memory: ``in_flight`` plus ``process_bytes``."""
        return self.in_flight() + self.process_bytes(resident)


# What a merge's compiled programs add to a process that has imported JAX and
# opened its inputs, taken from merges of a 5M-parameter model (bench_merge_io
# --scale 0.01, x86-64 Linux): its XLA programs and runtime; numba and its
# kernels, for the methods with a sparsifier.
_PROGRAM_BYTES = 100 << 20
_KERNEL_BYTES = 100 << 20


def resident_bytes() -> int:
    """This process's resident memory now, in bytes (its peak so far where
    ``/proc`` is not there to say)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def make_plan(mc: cfg_lib.MergeConfig, allow_vocab_mismatch: bool = False) -> Plan:
    method = mc.merge_method
    if method not in merging.METHODS:
        raise MergeFailed(f"{mc.source}: unknown merge_method {method!r}; choose from {', '.join(merging.METHODS)}")
    spec = registry.get(method)
    same = lambda a, b: os.path.abspath(a) == os.path.abspath(b)
    n_given = len(mc.slices[0].sources) if mc.slices else len(mc.models)
    needs_base = spec.needs_base or (method == "slerp" and n_given == 1)
    if needs_base and not mc.base_model:
        raise MergeFailed(f"{mc.source}: merge_method {method!r} needs a base_model")
    use_base = bool(mc.base_model) and spec.uses_base
    # every input opened once; heads made explicit where some inputs tie theirs to the embeddings
    paths = [x.path for sl in mc.slices for x in sl.sources] or [e.path for e in mc.models]
    opened = sources.untie_head({p: open_source(p) for p in dict.fromkeys(
        paths + ([mc.base_model] if use_base and not mc.slices else []))})
    if mc.slices:
        try:
            layout = slices.plan(mc, opened.__getitem__, use_base)
        except slices.SliceError as e:
            raise MergeFailed(str(e)) from None
        base, models, names, scopes = layout.base, layout.models, layout.names, layout.scopes
        n_layers = layout.n_layers
    else:
        # mergekit configs often list the base among the models too
        entries = [(i, e) for i, e in enumerate(mc.models) if not (mc.base_model and same(e.path, mc.base_model))]
        base = opened[mc.base_model] if use_base else None
        models = [opened[e.path] for _, e in entries]
        if not models:
            raise MergeFailed(f"{mc.source}: no models to merge besides the base")
        names = (base or models[0]).names
        n_layers = _n_layers(base or models[0], names)
        per_model = tuple((f"models[{i}].parameters", e.parameters) for i, e in entries)
        scopes = {n: cfg_lib.Scope(per_model, (("parameters", mc.parameters),), cfg_lib.layer_position(n, n_layers))
                  for n in names}
    count = len(models) + (method == "slerp" and base is not None)  # SLERP from the base to one model
    if not spec.min_models <= count <= (spec.max_models or count):
        many = (f"exactly {spec.max_models}" if spec.max_models == spec.min_models
                else f"{spec.min_models} to {spec.max_models}" if spec.max_models else f"at least {spec.min_models}")
        raise MergeFailed(f"{mc.source}: merge_method {method!r} merges {many} model(s), got {count}"
                          + (" per slice" if mc.slices else ""))
    ref = base or models[0]
    vocab_rows = {}
    for src in models + ([base] if base else []):
        missing = [n for n in names if n not in src.shapes]
        extra = [n for n in src.names if n not in ref.shapes]
        if missing or extra:
            raise MergeFailed(f"{src.path}: tensor names differ from {ref.path}: missing {missing[:3]}, extra {extra[:3]}")
        bad = []
        for n in names:
            a, b = src.shapes[n], ref.shapes[n]
            if a == b:
                continue
            if cfg_lib.VOCAB.search(n) and a[1:] == b[1:]:
                if not allow_vocab_mismatch:
                    raise MergeFailed(
                        f"{src.path}: {n} has {a[0]} vocabulary rows, {ref.path} has {b[0]}. The models use different "
                        "tokenizers or added tokens, so rows past the shared ones mean different things. Pass "
                        "--allow-vocab-mismatch to merge the common rows only (the rest are copied from "
                        f"{ref.path})."
                    )
                vocab_rows[n] = min(vocab_rows.get(n, b[0]), a[0])
            else:
                bad.append(f"{n} {a} vs {b}")
        if bad:
            raise MergeFailed(f"{src.path}: tensor shapes differ from {ref.path}: {bad[:3]}")
    spell = lambda p: "lambda" if p == "lam" else p
    levels = [("parameters", mc.parameters, False)]  # every place parameters are given, the base's too
    levels += [(f"models[{i}].parameters", e.parameters, True) for i, e in enumerate(mc.models)]
    for s, sl in enumerate(mc.slices):
        levels += [(f"slices[{s}].parameters", sl.parameters, False)]
        levels += [(f"slices[{s}].sources[{i}].parameters", x.parameters, True) for i, x in enumerate(sl.sources)]
    for where, params, per_model in levels:
        given = [_GLOBAL_RENAME.get(k, k) for k in params if k not in _IGNORED]
        try:
            registry.check_names(method, given, spell)
        except merging.MergeError as e:
            raise MergeFailed(f"{mc.source}: {where}: {e}") from None
        shared = [spell(k) for k in given if per_model and not registry.PARAMS_DEF[k].per_model]
        if shared:
            raise MergeFailed(f"{mc.source}: {where}: {', '.join(shared)} is one value for the whole merge; set it "
                              "under the top-level parameters" + (" or the slice's" if mc.slices else ""))
    inputs = [o.path for src in ([base] if base else []) + models for o in sources.origins(src)]
    try:
        template = metadata.check_tokenizer(mc, inputs, {ref.shapes[n][0] for n in names
                                                         if cfg_lib.VOCAB.search(n) and ref.shapes[n]})
    except metadata.MetadataError as e:
        raise MergeFailed(str(e)) from None
    return Plan(method, base, models, scopes, names, n_layers, vocab_rows,
                jnp.dtype(mc.dtype) if mc.dtype else None, template)


def _n_layers(ref: TensorSource, names) -> int:
    cj = ref.config_json()
    if cj:
        n = json_object(cj).get("num_hidden_layers")
        if n is not None and not (type(n) is int and n >= 0):
            raise CheckpointError(f"{cj}: num_hidden_layers is {n!r}, not a count of layers")
        if n:
            return n
    idx = [int(m.group(1)) for n in names if (m := cfg_lib.LAYER.search(n))]
    return max(idx) + 1 if idx else 1


def tensor_params(plan: Plan, name: str, source: str) -> dict:
    """Tensor ``name``'s parameters as the config gives them (``config.Scope``): the
    shared ones, then the per-model ones as lists, a model's missing value (or
    a filter list that does not match) taken from the shared levels, else the
    method's default."""
    sc = plan.scopes[name]
    out = {}
    for label, params in reversed(sc.shared):  # the most specific level last, so that it wins
        for k, v in params.items():
            if k not in _IGNORED:
                value = cfg_lib.resolve(v, name, sc.t, f"{source}: {label}.{k}")
                if value is not None:
                    out[_GLOBAL_RENAME.get(k, k)] = value
    spec = registry.get(plan.method)
    for k in dict.fromkeys(k for _, params in sc.models for k in params if k not in _IGNORED):
        key = _GLOBAL_RENAME.get(k, k)
        values = [cfg_lib.resolve(p[k], name, sc.t, f"{source}: {label}.{k}") if k in p else None
                  for label, p in sc.models]
        fallback = out.get(key, spec.default(key) if key in spec.params else None)
        out[key] = [fallback if v is None else v for v in values]
    return out


def check_tensor_params(plan: Plan, name: str, source: str) -> dict:
    """Tensor ``name``'s parameters as the merge will use them, checked as ``merge``
    checks them: ``registry.resolve`` of ``tensor_params`` (given, else the
    method's default), plus ``out_dtype`` and ``check_finite`` where given."""
    params = tensor_params(plan, name, source)
    try:
        values = registry.resolve(plan.method, len(plan.models), params)
    except merging.MergeError as e:
        raise MergeFailed(f"{source}: tensor {name}: {_name_models(str(e), plan)}") from None
    return {**values, **{k: params[k] for k in registry.COMMON if k in params}}


def written_dtype(plan: Plan, mc, name: str) -> np.dtype:
    """The dtype tensor ``name`` is written in: the config's ``out_dtype``, else its
    ``dtype``, else the stored one (tensors that are not floats: the stored one)."""
    stored = plan.sources[0].dtypes[name]
    want = mc.out_dtype or mc.dtype
    return np.dtype(want) if want and _is_float(stored) else np.dtype(stored)


def _show(value) -> str:
    """A resolved parameter as YAML spells it: per-model values comma-separated."""
    if isinstance(value, (tuple, list)):
        return ", ".join(map(_show, value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(plan: Plan, mc, seed: int | None = None) -> str:
    """The plan as ``--dry-run`` prints it, with each parameter as the merge will use
    it (``check_tensor_params``).  Parameters the same for every tensor are
    listed once, marked ``(default)`` where the config leaves them to the
    method; the others beside each tensor.  Each tensor's dtype is the stored
    one, ``-> `` the one written where they differ."""
    ref, source = plan.sources[0], mc.source
    method = registry.get(plan.method)
    lines = [f"merge_method: {plan.method} ({method.paper})", f"base: {plan.base.path if plan.base else '-'}"]
    lines += [f"model {i}: {m.path}" for i, m in enumerate(plan.models)]
    start = 0
    for s, sl in enumerate(mc.slices):  # where each output layer comes from
        if s == 0:
            lines.append("slices (output layers <- each source's layer_range):")
        span = f"{start}..{start + sl.n_layers - 1}" if sl.n_layers else "none"
        lines.append(f"  slices[{s}]: {span} <- " + ", ".join(f"{x.path} {list(x.layer_range)}" for x in sl.sources))
        start += sl.n_layers
    params = {n: check_tensor_params(plan, n, source) for n in plan.names}
    given = {_GLOBAL_RENAME.get(k, k) for sc in plan.scopes.values() for _, p in (*sc.models, *sc.shared) for k in p}
    spell = {v: k for k, v in _GLOBAL_RENAME.items()}.get
    varying = []
    lines.append("parameters (per-model values in model order):")
    for k in dict.fromkeys(k for n in plan.names for k in params[n]):
        shown = {_show(params[n].get(k)) for n in plan.names}
        if len(shown) > 1:
            varying.append(k)
            lines.append(f"  {spell(k, k):<14} varies by tensor (below)")
        else:
            lines.append(f"  {spell(k, k):<14} {shown.pop()}{'' if k in given else '  (default)'}")
    if method.random and seed is not None:
        lines.append(f"  {'seed':<14} {seed}  (--seed)")
    if mc.chat_template is not None:
        how = ("auto: none of the inputs has one, the tokenizer files' own kept" if plan.chat_template is None
               else "auto: the one most inputs have" if mc.chat_template == "auto" else "from the config")
        lines.append(f"chat_template: {how}" + (f" ({len(plan.chat_template)} characters)" if plan.chat_template else ""))
    lines.append(f"{len(plan.names)} tensors, {plan.n_layers} layers:")
    for n in plan.names:
        extra = "  ".join(f"{spell(k, k)}={_show(params[n][k])}" for k in varying)
        out = written_dtype(plan, mc, n)
        dtype = str(ref.dtypes[n]) + ("" if out == np.dtype(ref.dtypes[n]) else f" -> {out}")
        lines.append(f"  {n:<60} {str(ref.shapes[n]):<18} {dtype}{'  ' + extra if extra else ''}")
    gb = lambda b: f"{b / 2**30:.2f} GiB"
    lines.append(f"bytes to read: {plan.bytes_read():,} ({gb(plan.bytes_read())})")
    lines.append(f"bytes to write: {plan.bytes_written():,} ({gb(plan.bytes_written())})")
    process, in_flight, held = plan.process_bytes(), plan.in_flight(), plan.held()
    lines.append(f"estimated peak memory: {gb(in_flight + process)} ({gb(in_flight)} of tensors in flight, most "
                 f"while merging {max(held, key=held.get)}; {gb(process)} for the process and its compiled programs)")
    return "\n".join(lines)


def _devices(device: str):
    platform = {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu", "cpu": "cpu"}.get(device)
    if platform is None:
        raise MergeFailed(f"--device {device!r}: choose cpu, gpu or tpu")
    try:
        devs = jax.devices(platform)
    except RuntimeError:
        raise MergeFailed(f"--device {device}: no {device} devices available here") from None
    return devs


def _place(arr: np.ndarray, devs):
    """Large tensors are split over every device of the platform along axis 0."""
    if len(devs) > 1 and arr.ndim >= 1 and arr.shape[0] % len(devs) == 0 and arr.size >= 1 << 20:
        mesh = jax.sharding.Mesh(np.asarray(devs), ("d",))
        return jax.device_put(arr, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    return jax.device_put(arr, devs[0])


def run(mc: cfg_lib.MergeConfig, out_dir: str, *, device: str = "cpu", shard_size: int = 5 * 2**30, force: bool = False,
        seed: int = 0, dry_run: bool = False, allow_vocab_mismatch: bool = False, progress: bool = True,
        map_inputs: bool = True) -> str | None:
    """Merge ``mc`` into ``out_dir`` (see the module docstring); returns it, or None
    for a dry run.  ``map_inputs=False`` ``pread``s every input tensor rather than
    mapping it (``mapped_inputs``): for inputs that may change during the merge."""
    plan = make_plan(mc, allow_vocab_mismatch)
    for name in plan.names:  # resolve and check every parameter as the merge will, before reading any tensor
        check_tensor_params(plan, name, mc.source)
    _global_trim(plan, mc)
    if dry_run:
        print(describe(plan, mc, seed))
        return None
    inputs = [o.path for src in plan.sources for o in sources.origins(src)]
    if mc.tokenizer_source:
        inputs.append(mc.tokenizer_source)
    try:
        output = Output(out_dir, inputs=inputs, force=force, log=lambda m: print(m, file=sys.stderr))
    except OutputError as e:
        raise MergeFailed(str(e)) from None
    # found before any work, not after most of it; a dead run's leftovers here are removed first
    why = no_room(output.out, plan.bytes_written(), output.leftover_bytes())
    if why:
        raise MergeFailed(f"{why}; free some space or choose another output directory")
    devs = _devices(device)
    try:
        with output:
            _merge_into(plan, mc, output.tmp, devs, shard_size, seed, progress, map_inputs)
            return output.commit()
    except OutputError as e:
        raise MergeFailed(str(e)) from None
    except OSError as e:  # a full disk (or a failing one) while writing: the partial output is gone
        raise MergeFailed(f"{e.filename or output.out}: {e.strerror or e}; the partial output was removed") from None


def _global_trim(plan: Plan, mc) -> tuple | None:
    """The options of a ``trim: global`` merge (one density per model for the whole model), or None."""
    trims = {tensor_params(plan, n, mc.source).get("trim", "tensor") for n in plan.names}
    if plan.method != "ties" or "global" not in trims:
        return None
    if len(trims) > 1:
        raise MergeFailed(f"{mc.source}: trim: global ranks each model over the whole model, so it cannot be set "
                          "for some tensors only")
    opts = None
    for name in plan.names:
        o = merging.options(plan.method, len(plan.models), tensor_params(plan, name, mc.source))
        if opts is not None and o.density != opts.density:
            raise MergeFailed(f"{mc.source}: trim: global keeps the top density of each model over the whole model, "
                              f"so density cannot vary by tensor; {name} has {list(o.density)}, other tensors "
                              f"{list(opts.density)}")
        opts = o
    return opts if opts is not None and task_vectors.uses_global_trim(opts) else None


def _merge_into(plan: Plan, mc, tmp: str, devs, shard_size: int, seed: int, progress: bool, map_inputs: bool):
    srcs = plan.sources
    in_dtype = jnp.dtype(mc.dtype) if mc.dtype else None
    out_dtype = mc.out_dtype or mc.dtype
    ref_src = srcs[0]
    global_opts = _global_trim(plan, mc)
    names = sorted(plan.names) if global_opts else plan.names  # the global trim breaks ties in name order
    layout = [(n, ref_src.shapes[n], written_dtype(plan, mc, n)) for n in names]
    writer = ShardWriter(tmp, shard_size, layout=layout)  # each tensor goes straight to its shard on disk
    cast_to = lambda n: None if plan.widened(n) else in_dtype  # the dtype tensor n's float inputs are cast to, if any
    recipe = task_vectors.RECIPES.get(plan.method)
    if recipe is not None and devs[0].platform == "cpu" and names:  # numba loads while the first tensors are read
        cpu.warm_up(recipe.sparsify, cast_to(names[0]) or ref_src.dtypes[names[0]], len(plan.models))
    root = jax.random.key(seed)
    pool = cf.ThreadPoolExecutor(1)
    write_pool = cf.ThreadPoolExecutor(1)  # writes in order, one tensor (or block) behind the merge
    written = None

    def write(fn, *args):
        nonlocal written
        if written is not None:
            written.result()  # at most one finished tensor or block waits for the disk
        written = write_pool.submit(fn, *args)

    def cast_for(n):  # the cast of tensor n's inputs to cast_to(n)
        dt = cast_to(n)
        return lambda a: a.astype(dt, copy=False) if dt is not None and _is_float(a.dtype) else a

    mapped = map_inputs and mapped_inputs(plan.method, devs)
    how = "view" if mapped else "read"  # the sources' method that gives a tensor
    read = lambda n: [getattr(s, how)(n) for s in srcs]
    blocks = {n: _blocks(plan, n, srcs, cast_for(n), how) for n in names
              if _is_float(ref_src.dtypes[n]) and (global_opts or plan.blocked(n))}
    bar = tqdm(total=plan.bytes_read(), unit="B", unit_scale=True, unit_divisor=1024, desc="merge",
               disable=not progress)
    set_bytes = lambda n: sum(s.nbytes(n) for s in srcs)
    whole = lambda j: j < len(names) and names[j] not in blocks
    pending = pool.submit(read, names[0]) if names and whole(0) else None
    t0 = time.perf_counter()
    try:
        trims = offsets = None
        if global_opts:  # first pass: each model's threshold over the whole model
            try:
                trims = [[th] for th in chunked.global_thresholds([blocks[n] for n in names if n in blocks], global_opts)]
            except merging.MergeError as e:
                _screen_all(plan, mc, blocks, names)
                raise MergeFailed(f"{mc.source}: {e}") from None
            offsets = [[0] for _ in plan.models]
        for j, name in enumerate(names):
            if name in blocks:
                pending = pool.submit(read, names[j + 1]) if whole(j + 1) else None  # read while this one merges
                offsets = _merge_blocks(plan, mc, blocks[name], root, out_dtype or ref_src.dtypes[name],
                                        lambda a, name=name: write(writer.add_rows, name, a), global_opts, trims,
                                        offsets)
                bar.update(set_bytes(name))
                bar.set_postfix(tensors=f"{j + 1}/{len(names)}")
                continue
            arrays = pending.result() if pending is not None else read(name)
            pending = None
            # read the next tensor while merging this one, unless the two sets together
            # would exceed the prefetch budget (large tensors: read those in turn)
            if whole(j + 1) and set_bytes(name) + set_bytes(names[j + 1]) <= _PREFETCH_BUDGET:
                pending = pool.submit(read, names[j + 1])
            ref = arrays[0]
            rows = plan.vocab_rows.get(name)
            work = [a[:rows] if rows else a for a in arrays]
            if not _is_float(ref.dtype):
                out = ref  # integer buffers (e.g. position ids) are copied from the base
            else:
                cast_n = cast_for(name)
                work = [cast_n(a) if mapped else _place(cast_n(a), devs) for a in work]
                key = root if plan.method in merging.RANDOM_METHODS else None  # merge() folds in the tensor's name
                out = _merge_tensor(plan, mc, name, work, key, out_dtype or ref.dtype)
                if rows:  # the rows past the common vocabulary: the reference input's
                    out = np.concatenate([np.asarray(out), np.asarray(ref[rows:]).astype(out.dtype)])
            del arrays, work
            write(writer.add, name, out)
            del ref, out  # the writer holds the output until it is on disk; nothing else outlives the tensor
            bar.update(set_bytes(name))
            bar.set_postfix(tensors=f"{j + 1}/{len(names)}")
        if written is not None:
            written.result()
    finally:  # never leave a thread writing into a directory that is being removed
        bar.close()
        pool.shutdown(cancel_futures=True)
        write_pool.shutdown()
    writer.finish()
    header = (f"# written by research-merge in {time.perf_counter() - t0:.1f} s; rerun with: research-merge THIS_FILE "
              "OUT" + (f" --seed {seed}" if plan.method in merging.RANDOM_METHODS else ""))
    metadata.write(plan, mc, tmp, out_dtype, sources.origins(plan.base or plan.models[0])[0], plan.chat_template,
                   header)


# The methods with a sparsifier: on the CPU their tensors go to the numba kernels.
MAPPED_METHODS = frozenset(m for m, r in task_vectors.RECIPES.items() if r.sparsify is not None)


def mapped_inputs(method: str, devs) -> bool:
    """Whether a merge reads its inputs mapped from the page cache rather than copied:
    where the numba kernels of the CPU backend take them as they are (the
    ``MAPPED_METHODS``, on the default device, a CPU).  The XLA programs would copy
    a mapped tensor to align it, so they get ``pread``'s aligned buffers."""
    return cpu.ENABLED and method in MAPPED_METHODS and devs[0].platform == "cpu" and devs[0] == jax.devices()[0]


def _blocks(plan: Plan, name: str, srcs, cast, how: str) -> chunked.Tensor:
    """Tensor ``name`` of every input, read in row blocks of ``Plan.block_shape``
    (each source's ``how``: ``read`` or ``view``), each block passed through
    ``cast`` (to the config's dtype, or left as it is where ``Plan.widened``)."""
    shape, flat = plan.block_shape(name), plan.flat(name)
    reader = lambda src: (lambda start, stop: cast(getattr(src, how)(name, (start, stop), flat=flat))) if shape else (
        lambda start, stop: cast(getattr(src, how)(name)).reshape(1))
    columns = lambda src: lambda start, stop, c0, c1: cast(src.columns(name, (start, stop), (c0, c1)))
    base = reader(plan.base) if plan.base else None
    return chunked.Tensor(name, shape, base, [reader(m) for m in plan.models], rows=plan.vocab_rows.get(name),
                          itemsize=plan.itemsize(name), own_shape=plan.ref.shapes[name],
                          columns=(columns(plan.base) if plan.base else None, [columns(m) for m in plan.models]))


def _screen_all(plan: Plan, mc, blocks, names) -> None:
    for n in names:
        if n in blocks:
            try:
                chunked._screen_all(blocks[n])
            except merging.MergeError as e:
                raise MergeFailed(f"{mc.source}: tensor {n}: {_name_models(str(e), plan)}") from None


def _merge_blocks(plan: Plan, mc, t: chunked.Tensor, root, out_dtype, write, global_opts, trims, offsets):
    """One tensor merged and written in row blocks; the rows past ``t.rows`` (vocabularies
    that differ) are copied from the first input.  Returns the global trim's tie offsets."""
    params = tensor_params(plan, t.name, mc.source)
    out_dtype = jnp.dtype(params.pop("out_dtype", None) or out_dtype)
    try:
        if global_opts is not None:
            offsets = chunked.merge_trimmed(dataclasses.replace(global_opts, density=(1.0,) * len(plan.models)),
                                            t, trims, out_dtype, write, offsets)
        else:
            opts = merging.options(plan.method, len(plan.models), params)
            chunked.merge_blocks(plan.method, opts, t, root, out_dtype, write)
    except merging.MergeError as e:
        raise MergeFailed(f"{mc.source}: tensor {t.name}: {_name_models(str(e), plan)}") from None
    if t.rows < t.shape[0]:
        first = t.base or t.models[0]
        for start, stop in chunked.spans(t.shape[0] - t.rows, t.step):
            write(np.asarray(first(t.rows + start, t.rows + stop)).astype(out_dtype))
    return offsets


def _merge_tensor(plan: Plan, mc, name: str, work, key, out_dtype) -> np.ndarray:
    """``merging.merge`` on one tensor of every input (base first, when there is one)."""
    base = {name: work[0]} if plan.base else None
    models = [{name: w} for w in (work[1:] if plan.base else work)]
    try:
        merged = merging.merge(plan.method, models, base=base, key=key, out_dtype=out_dtype,
                               **tensor_params(plan, name, mc.source))[name]
    except merging.MergeError as e:
        raise MergeFailed(f"{mc.source}: tensor {name}: {_name_models(str(e), plan)}") from None
    return np.asarray(jax.device_get(merged))


def _name_models(msg: str, plan: Plan) -> str:
    for i, m in enumerate(plan.models):
        msg = msg.replace(f"model {i}", f"model {i} ({m.path})")
    return msg
