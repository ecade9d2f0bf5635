"""mergekit's ``slices:``: the output's layers taken from layer ranges of the inputs.

Each slice lists its sources, each with a ``layer_range: [start, end)``, all
of one length ``n``; the slice gives the output ``n`` layers, after those of
the slices before it, layer ``o`` of them merged from layer ``start + o`` of
each source.  Tensors outside the layer stack come from the first slice's
sources (the embeddings) or the last's (everything else: the final norm,
the head).  Worked example, two 4-layer models ``a`` and ``b``::

    slices:
      - sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 2]}]
      - sources: [{model: a, layer_range: [1, 4]}, {model: b, layer_range: [1, 4]}]

    output                        input position 0           input position 1
    model.embed_tokens.weight     a  model.embed_tokens...   b  model.embed_tokens...
    model.layers.0.*  (t = 0)     a  model.layers.0.*        b  model.layers.0.*
    model.layers.1.*  (t = 1)     a  model.layers.1.*        b  model.layers.1.*
    model.layers.2.*  (t = 0)     a  model.layers.1.*        b  model.layers.1.*
    model.layers.3.*  (t = 0.5)   a  model.layers.2.*        b  model.layers.2.*
    model.layers.4.*  (t = 1)     a  model.layers.3.*        b  model.layers.3.*
    model.norm.weight, lm_head    a  (the last slice's)      b

``t`` is where a gradient is read: a slice's layer ``o`` of ``n`` at
``o / (n - 1)`` (1 where ``n`` is 1), the tensors outside the stack at 0, as
mergekit plans them.  Each input position is a ``NameMap`` that reads every
output tensor from its own source and tensor, so the merge itself is the
same as for whole models (``sources.NameMap``).  The base model (``base_model``), where the method
uses one, is a position of its own: every slice lists it among its sources.
"""

from __future__ import annotations

import dataclasses
import os
import re

from research.merging.stream import config as cfg_lib
from research.merging.stream.sources import NameMap

_BEFORE_LAYERS = re.compile(r"embed|wte|wpe|word_embeddings")  # tensors planned with the first slice


class SliceError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Layout:
    base: NameMap | None
    models: list  # NameMap per input position
    scopes: dict  # output tensor -> cfg_lib.Scope, in output order: embeddings, layers, the rest
    n_layers: int

    @property
    def names(self) -> list:
        return list(self.scopes)


def layers_of(src) -> dict:
    """``{layer index: [tensor names]}`` of a source's layer stack."""
    out = {}
    for n in src.names:
        if m := cfg_lib.LAYER.search(n):
            out.setdefault(int(m.group(1)), []).append(n)
    return out


def _renamed(name: str, layer: int) -> str:
    m = cfg_lib.LAYER.search(name)
    return name[:m.start(1)] + str(layer) + name[m.end(1):]


def _positions(mc: cfg_lib.MergeConfig, use_base: bool) -> list:
    """Per slice: ``(base, models)``, the base's ``(index in sources, source)`` (None
    where the method reads no base) and each model's, checked."""
    is_base = lambda x: bool(mc.base_model) and os.path.abspath(x.path) == os.path.abspath(mc.base_model)
    split = []
    for s, sl in enumerate(mc.slices):
        bases = [(i, x) for i, x in enumerate(sl.sources) if is_base(x)]
        if use_base and not bases:
            raise SliceError(f"{mc.source}:{sl.line}: slices[{s}] does not list base_model {mc.base_model} among its "
                             "sources; the base's layers come from its layer_range there")
        split.append((bases[0] if use_base else None, [(i, x) for i, x in enumerate(sl.sources) if not is_base(x)]))
    counts = [len(models) for _, models in split]
    if len(set(counts)) > 1 or 0 in counts:
        raise SliceError(f"{mc.source}: every slice needs the same number of models besides the base (at least one), "
                         f"got {counts} for slices 0..{len(split) - 1}")
    return split


def plan(mc: cfg_lib.MergeConfig, source, use_base: bool) -> Layout:
    """The output of ``mc.slices``: each input position's ``NameMap`` and each
    tensor's parameter scope.  ``source(path)``: the opened model at ``path``;
    ``use_base``: whether the method reads ``mc.base_model``."""
    split = _positions(mc, use_base)
    stacks = {}
    for s, (b, models) in enumerate(split):
        for i, x in ([b] if b else []) + models:
            if x.path not in stacks:
                stacks[x.path] = layers_of(source(x.path))
            missing = sorted(set(range(*x.layer_range)) - set(stacks[x.path]))
            if missing:
                raise SliceError(f"{mc.source}:{mc.slices[s].line}: slices[{s}].sources[{i}] asks for layer_range "
                                 f"{list(x.layer_range)}, but {x.path} has {len(stacks[x.path])} layers "
                                 f"(no layer {missing[0]})")

    tables = [{} for _ in range(len(split[0][1]) + 1)]  # per input position, the base's first
    scopes = {}  # output tensor -> its parameters' scope, in output order

    def add(out_name, s, t, input_name):
        """Output tensor ``out_name`` of slice ``s`` at gradient position ``t``: each
        position's tensor ``input_name(slice source)``."""
        b, models = split[s]
        for table, x in zip(tables, [b and b[1]] + [x for _, x in models]):
            if x is not None:
                src, n = source(x.path), input_name(x)
                if n not in src.shapes:
                    raise SliceError(f"{mc.source}:{mc.slices[s].line}: {x.path} has no tensor {n} "
                                     f"(for {out_name} of slices[{s}])")
                table[out_name] = (src, n)
        scopes[out_name] = cfg_lib.Scope(
            tuple((f"slices[{s}].sources[{i}].parameters", x.parameters) for i, x in models),
            ((f"slices[{s}].parameters", mc.slices[s].parameters), ("parameters", mc.parameters)), t)

    first = lambda s: (split[s][0] or split[s][1][0])[1]  # the source whose tensor names the output follows
    last = len(mc.slices) - 1
    for n in source(first(0).path).names:
        if not cfg_lib.LAYER.search(n) and _BEFORE_LAYERS.search(n):
            add(n, 0, 0.0, lambda x, n=n: n)
    out_layer = 0
    for s, sl in enumerate(mc.slices):
        ref = first(s)
        for o in range(sl.n_layers):
            t = o / (sl.n_layers - 1) if sl.n_layers > 1 else 1.0
            for n in stacks[ref.path][ref.layer_range[0] + o]:
                add(_renamed(n, out_layer), s, t, lambda x, n=n, o=o: _renamed(n, x.layer_range[0] + o))
            out_layer += 1
    for n in source(first(last).path).names:
        if not cfg_lib.LAYER.search(n) and not _BEFORE_LAYERS.search(n):
            add(n, last, 0.0, lambda x, n=n: n)
    if not scopes:
        raise SliceError(f"{mc.source}: the slices select no tensors")
    for table in tables:  # the embeddings (first slice) and the head (last) must share one vocabulary
        rows = {n: (src.path, src.shapes[m][0]) for n, (src, m) in table.items() if cfg_lib.VOCAB.search(n)}
        if len({r for _, r in rows.values()}) > 1:
            raise SliceError(f"{mc.source}: the output's token rows would disagree: "
                             + ", ".join(f"{n} from {p} has {r}" for n, (p, r) in rows.items()))
    base = NameMap(tables[0]) if use_base else None
    return Layout(base, [NameMap(t) for t in tables[1:]], scopes, out_layer)
