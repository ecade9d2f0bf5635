"""mergekit-style YAML merge configs, validated with line numbers.

    merge_method: ties
    base_model: ./llama-base
    models:
      - model: ./llama-math
        parameters: {weight: 1.0, density: [0.2, 0.6]}     # a gradient over layers
      - model: ./llama-code
        parameters:
          weight: [{filter: mlp, value: 0.7}, {value: 1.0}] # filters: first match wins
    parameters: {lambda: 1.0, normalize: true}
    dtype: bfloat16
    out_dtype: bfloat16

A model is an HF directory, a ``.safetensors`` file, a training run of ours, or a
peft LoRA adapter on its base, ``model: ./llama-base+./math-adapter`` (or the
adapter directory alone when its ``adapter_config.json`` names a local base).

mergekit's ``slices:`` take the place of ``models:`` to merge layer ranges, each
output slice from its own sources' ``layer_range: [start, end)`` (end
exclusive; the same length in every source of a slice).  The output's layers
are the slices' in order; its embeddings come from the first slice's sources,
its final norm and head from the last's::

    merge_method: slerp
    base_model: ./a
    slices:
      - sources:
          - {model: ./a, layer_range: [0, 16]}
          - {model: ./b, layer_range: [0, 16]}
        parameters: {t: [0, 0.5]}      # a gradient over this slice's layers
      - sources:
          - {model: ./a, layer_range: [16, 32]}
          - {model: ./b, layer_range: [16, 32]}

A parameter value is a scalar, a list interpolated across layers (mergekit's
"gradient"), or a list of ``{filter: SUBSTRING, value: V}`` whose first entry
whose filter occurs in the tensor name wins (``filter: "*"``, or an entry
without one, matches everything).  As in mergekit, a parameter is looked up
per tensor from the most specific place to the least: the model's (a slice
source's) ``parameters``, the slice's, the top-level ``parameters``, then the
method's default; a filter list none of whose entries matches the tensor
passes on to the next place.  Unknown keys are errors naming the key and its
line.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np
import yaml

TOP_KEYS = {"models", "slices", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "tokenizer", "chat_template"}
MODEL_KEYS = {"model", "parameters"}
SLICE_KEYS = {"sources", "parameters"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(@[\w./-]+)?")  # org/name[@revision]
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # a tensor of the layer stack, and its layer
VOCAB = re.compile(r"embed_tokens|lm_head|wte|word_embeddings")  # a tensor with a row per token


class ConfigError(ValueError):
    """A bad merge config; the message names the file, line and key."""


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader, node):
    mapping = loader.construct_mapping(node, deep=True)
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if hasattr(k, "value")}
    return _Map(mapping, lines, node.start_mark.line + 1)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Map(dict):
    """A dict that remembers the line of each key."""

    def __init__(self, data, lines, line):
        super().__init__(data)
        self.lines, self.line = lines, line


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    path: str
    parameters: dict


@dataclasses.dataclass(frozen=True)
class SliceSource:
    path: str
    layer_range: tuple  # (start, end): layers start .. end - 1
    parameters: dict


@dataclasses.dataclass(frozen=True)
class Slice:
    sources: tuple  # SliceSource
    parameters: dict
    line: int = 0  # of the slice in the config file

    @property
    def n_layers(self) -> int:
        return self.sources[0].layer_range[1] - self.sources[0].layer_range[0]


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    merge_method: str
    models: tuple  # ModelEntry; empty where ``slices`` are given
    base_model: str | None
    parameters: dict
    dtype: str | None
    out_dtype: str | None
    source: str = ""
    raw: Any = None
    tokenizer_source: str | None = None  # a model directory whose tokenizer files the output gets
    slices: tuple = ()  # Slice, where the config gives ``slices:`` rather than ``models:``
    chat_template: str | None = None  # the output's chat template (Jinja), or "auto"


@dataclasses.dataclass(frozen=True)
class Scope:
    """Where one tensor's parameters are looked up, most specific first (mergekit's
    order): each model's ``(label, parameters)``, then the shared levels (a
    slice's, the top level's), then the method's default.  ``t``: the gradient
    position."""

    models: tuple
    shared: tuple
    t: float


DTYPES = ("float32", "float16", "bfloat16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
# chat_template: NAME, the templates shipped here (else the config gives the template's Jinja text, or "auto")
CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               "{% endif %}"),
}


def _where(path, m, key):
    line = m.lines.get(key, m.line) if isinstance(m, _Map) else "?"
    return f"{path}:{line}"


def load(path: str) -> MergeConfig:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    with open(path) as f:
        try:
            doc = yaml.load(f, Loader=_Loader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for key in doc:
        if key not in TOP_KEYS:
            raise ConfigError(f"{_where(path, doc, key)}: unknown key {key!r} (accepted: {', '.join(sorted(TOP_KEYS))})")
    if "merge_method" not in doc:
        raise ConfigError(f"{path}: missing 'merge_method'")
    if ("models" in doc) == ("slices" in doc):
        raise ConfigError(f"{path}: give either 'models' (whole models) or 'slices' (layer ranges), "
                          f"{'not both' if 'models' in doc else 'one of them'}")
    base_dir = os.path.dirname(os.path.abspath(path))
    one = lambda p: p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))
    # "BASE+ADAPTER" (mergekit's syntax for a LoRA adapter on a base): each part resolved
    local = lambda p: one(p) if "+" not in p or os.path.exists(one(p)) else "+".join(one(q) for q in p.rsplit("+", 1))

    def resolve(p, m=doc, key="model"):
        """A model's path, absolute; a Hugging Face Hub id that is no local path is an error."""
        out = local(p)
        if _HUB_ID.fullmatch(p) and not os.path.exists(out):
            raise ConfigError(f"{_where(path, m, key)}: {out} does not exist. If {p!r} is a Hugging Face Hub id: "
                              "research-merge reads local checkpoints only, so download it first (huggingface-cli "
                              f"download {p.split('@')[0]} --local-dir DIR) and give DIR")
        return out
    entries, slices = [], []
    if "models" in doc:
        for i, m in enumerate(_list(path, doc, "models")):
            m = _entry(path, m, f"models[{i}]", MODEL_KEYS)
            entries.append(ModelEntry(resolve(str(m["model"]), m), _params(path, m, f"models[{i}]")))
    else:
        for s, sl in enumerate(_list(path, doc, "slices")):
            if not isinstance(sl, dict) or "sources" not in sl:
                raise ConfigError(f"{path}:{getattr(sl, 'line', '?')}: slices[{s}] needs a 'sources' list")
            _known(path, sl, f"slices[{s}]", SLICE_KEYS)
            sources = []
            for i, m in enumerate(_list(path, sl, "sources", f"slices[{s}].sources")):
                where = f"slices[{s}].sources[{i}]"
                m = _entry(path, m, where, SOURCE_KEYS)
                sources.append(SliceSource(resolve(str(m["model"]), m), _layer_range(path, m, where),
                                           _params(path, m, where)))
            lengths = {src.layer_range[1] - src.layer_range[0] for src in sources}
            if len(lengths) > 1:
                raise ConfigError(f"{_where(path, sl, 'sources')}: the sources of slices[{s}] must span the same "
                                  f"number of layers, got layer ranges {[list(x.layer_range) for x in sources]}")
            slices.append(Slice(tuple(sources), _params(path, sl, f"slices[{s}]"), sl.line))
    base = doc.get("base_model")
    dtypes = {}
    for key in ("dtype", "out_dtype"):
        value = doc.get(key)
        if isinstance(value, str) and value.startswith("torch."):  # mergekit takes "torch.bfloat16" too
            value = value[len("torch."):]
        if value is not None and value not in DTYPES:
            raise ConfigError(f"{_where(path, doc, key)}: {key} {doc[key]!r} is not supported; choose from "
                              f"{', '.join(DTYPES)}")
        dtypes[key] = value
    params = doc.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{_where(path, doc, 'parameters')}: 'parameters' must be a mapping, got {params!r}")
    tok = doc.get("tokenizer_source")
    if "tokenizer" in doc:  # mergekit's newer spelling, {source: ...}
        tc = doc["tokenizer"]
        if not isinstance(tc, dict):
            raise ConfigError(f"{_where(path, doc, 'tokenizer')}: 'tokenizer' must be a mapping like {{source: base}}")
        if tok is not None:
            raise ConfigError(f"{_where(path, doc, 'tokenizer')}: give 'tokenizer' or 'tokenizer_source', not both")
        for key in tc:
            if key in ("tokens", "pad_to_multiple_of"):
                raise ConfigError(f"{_where(path, tc, key)}: tokenizer.{key} (tokens added to or embedding rows "
                                  "padded in the output) is not supported; only tokenizer.source is")
        _known(path, tc, "tokenizer", {"source"})
        tok = tc.get("source")
    if tok is not None:
        if tok == "union":
            raise ConfigError(f"{_where(path, doc, 'tokenizer_source')}: tokenizer_source: union (a vocabulary built "
                              "from every model, with embedding rows mapped by token) is not supported; use 'base' "
                              "or the path of one model")
        if tok == "base":
            if not base:
                raise ConfigError(f"{_where(path, doc, 'tokenizer_source')}: tokenizer_source: base needs a base_model")
            tok = base
        tok = resolve(str(tok), key="tokenizer_source" if "tokenizer_source" in doc else "tokenizer")
    return MergeConfig(
        merge_method=str(doc["merge_method"]),
        models=tuple(entries),
        base_model=resolve(str(base), key="base_model") if base else None,
        parameters=dict(params or {}),
        dtype=dtypes["dtype"],
        out_dtype=dtypes["out_dtype"],
        source=path,
        raw=_plain(doc),
        tokenizer_source=tok,
        slices=tuple(slices),
        chat_template=_chat_template(path, doc),
    )


def _chat_template(path, doc) -> str | None:
    """``chat_template``: "auto" (the template most inputs have), a name of
    ``CHAT_TEMPLATES``, or a Jinja template's text (checked)."""
    if doc.get("chat_template") is None:
        return None
    text, where = doc["chat_template"], _where(path, doc, "chat_template")
    if not isinstance(text, str):
        raise ConfigError(f"{where}: chat_template must be a string, got {text!r}")
    if text == "auto" or text in CHAT_TEMPLATES:
        return CHAT_TEMPLATES.get(text, text)
    if "{" not in text:
        raise ConfigError(f"{where}: chat_template {text!r} is not a template shipped here "
                          f"({', '.join(CHAT_TEMPLATES)}) or 'auto'; give the template's Jinja text instead")
    from research.data import templates

    try:
        templates.ChatTemplate(text)
    except templates.TemplateError as e:
        raise ConfigError(f"{where}: {e}") from None
    return text


def _list(path, m, key, label=None) -> list:
    if not isinstance(m.get(key), list) or not m[key]:
        raise ConfigError(f"{_where(path, m, key)}: '{label or key}' must be a non-empty list")
    return m[key]


def _known(path, m, label, keys) -> None:
    for key in m:
        if key not in keys:
            raise ConfigError(f"{_where(path, m, key)}: unknown key {key!r} in {label} (accepted: "
                              f"{', '.join(sorted(keys))})")


def _entry(path, m, label, keys):
    if not isinstance(m, dict) or "model" not in m:
        raise ConfigError(f"{path}:{getattr(m, 'line', '?')}: {label} needs a 'model' key")
    _known(path, m, label, keys)
    return m


def _params(path, m, label) -> dict:
    if m.get("parameters") is not None and not isinstance(m["parameters"], dict):
        raise ConfigError(f"{_where(path, m, 'parameters')}: {label}.parameters must be a mapping")
    return dict(m.get("parameters") or {})


def _layer_range(path, m, label) -> tuple:
    r = m.get("layer_range")
    if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in r)
            and 0 <= r[0] <= r[1]):
        raise ConfigError(f"{_where(path, m, 'layer_range') if 'layer_range' in m else path + ':' + str(m.line)}: "
                          f"{label} needs layer_range: [start, end], 0 <= start <= end (end exclusive), got {r!r}")
    return tuple(r)


def rerunnable(mc: MergeConfig) -> dict:
    """The config as a YAML document that reruns this merge from anywhere: model paths absolute."""
    doc = dict(mc.raw)
    if mc.slices:
        doc["slices"] = [{**sl, "sources": [{**m, "model": src.path} for m, src in zip(sl["sources"], s.sources)]}
                         for sl, s in zip(mc.raw["slices"], mc.slices)]
    else:
        doc["models"] = [{**m, "model": e.path} for m, e in zip(mc.raw["models"], mc.models)]
    if mc.base_model:
        doc["base_model"] = mc.base_model
    if mc.tokenizer_source:
        doc.pop("tokenizer", None)
        doc["tokenizer_source"] = mc.tokenizer_source
    return doc


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def layer_position(name: str, n_layers: int) -> float:
    """Where a tensor sits in depth, the ``t`` a gradient is read at: layer i of n at
    i/(n-1) (1 where n is 1); every tensor outside the layer stack, the
    embeddings and the final norm and head alike, at 0.  These are mergekit's
    positions since its release 0.1.2 (before, the final norm and head were
    read at 1)."""
    m = LAYER.search(name)
    if not m:
        return 0.0
    return int(m.group(1)) / (n_layers - 1) if n_layers > 1 else 1.0


def resolve(value, name: str, t: float, where: str):
    """The value of one parameter for tensor ``name`` at gradient position ``t``:
    a scalar, a gradient read at ``t``, or the first matching filter's value;
    None where no filter matches (the lookup then passes on, as in mergekit)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for entry in value:
            unknown = set(entry) - {"filter", "value"}
            if unknown or "value" not in entry:
                raise ConfigError(f"{where}: filter entries are {{filter: SUBSTRING, value: V}}, got {dict(entry)}")
            if entry.get("filter") in (None, "*") or str(entry["filter"]) in name:
                return resolve(entry["value"], name, t, where)
        return None
    if isinstance(value, list):
        if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: a gradient is a list of numbers, got {value}")
        if len(value) == 1:
            return float(value[0])
        return float(np.interp(t * (len(value) - 1), np.arange(len(value)), value))
    if isinstance(value, bool) or isinstance(value, (int, float, str)):
        return value
    raise ConfigError(f"{where}: unsupported parameter value {value!r}")
