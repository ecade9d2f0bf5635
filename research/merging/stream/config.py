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

A parameter value is a scalar, a list interpolated across layers (mergekit's
"gradient"), or a list of ``{filter: SUBSTRING, value: V}`` whose first entry
whose filter occurs in the tensor name wins (an entry without ``filter`` matches
everything).  Unknown keys are errors naming the key and its line.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np
import yaml

TOP_KEYS = {"models", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source"}
MODEL_KEYS = {"model", "parameters"}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


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
class MergeConfig:
    merge_method: str
    models: tuple  # ModelEntry
    base_model: str | None
    parameters: dict
    dtype: str | None
    out_dtype: str | None
    source: str = ""
    raw: Any = None
    tokenizer_source: str | None = None  # a model directory whose tokenizer files the output gets


DTYPES = ("float32", "float16", "bfloat16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")


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
    if not isinstance(doc.get("models"), list) or not doc["models"]:
        raise ConfigError(f"{_where(path, doc, 'models')}: 'models' must be a non-empty list")
    base_dir = os.path.dirname(os.path.abspath(path))
    one = lambda p: p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))
    # "BASE+ADAPTER" (mergekit's syntax for a LoRA adapter on a base): each part resolved
    resolve = lambda p: one(p) if "+" not in p or os.path.exists(one(p)) else "+".join(one(q) for q in p.rsplit("+", 1))
    entries = []
    for i, m in enumerate(doc["models"]):
        if not isinstance(m, dict) or "model" not in m:
            raise ConfigError(f"{path}:{getattr(m, 'line', '?')}: models[{i}] needs a 'model' key")
        for key in m:
            if key not in MODEL_KEYS:
                raise ConfigError(f"{_where(path, m, key)}: unknown key {key!r} in models[{i}] (accepted: model, parameters)")
        if m.get("parameters") is not None and not isinstance(m["parameters"], dict):
            raise ConfigError(f"{_where(path, m, 'parameters')}: models[{i}].parameters must be a mapping")
        params = dict(m.get("parameters") or {})
        entries.append(ModelEntry(resolve(str(m["model"])), params))
    base = doc.get("base_model")
    for key in ("dtype", "out_dtype"):
        if doc.get(key) is not None and doc[key] not in DTYPES:
            raise ConfigError(f"{_where(path, doc, key)}: {key} {doc[key]!r} is not supported; choose from "
                              f"{', '.join(DTYPES)}")
    params = doc.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{_where(path, doc, 'parameters')}: 'parameters' must be a mapping, got {params!r}")
    tok = doc.get("tokenizer_source")
    if tok is not None:
        if tok == "union":
            raise ConfigError(f"{_where(path, doc, 'tokenizer_source')}: tokenizer_source: union (a vocabulary built "
                              "from every model, with embedding rows mapped by token) is not supported; use 'base' "
                              "or the path of one model")
        if tok == "base":
            if not base:
                raise ConfigError(f"{_where(path, doc, 'tokenizer_source')}: tokenizer_source: base needs a base_model")
            tok = base
        tok = resolve(str(tok))
    return MergeConfig(
        merge_method=str(doc["merge_method"]),
        models=tuple(entries),
        base_model=resolve(str(base)) if base else None,
        parameters=dict(params or {}),
        dtype=doc.get("dtype"),
        out_dtype=doc.get("out_dtype"),
        source=path,
        raw=_plain(doc),
        tokenizer_source=tok,
    )


def rerunnable(mc: MergeConfig) -> dict:
    """The config as a YAML document that reruns this merge from anywhere: model paths absolute."""
    doc = dict(mc.raw)
    doc["models"] = [{**m, "model": e.path} for m, e in zip(mc.raw["models"], mc.models)]
    if mc.base_model:
        doc["base_model"] = mc.base_model
    if mc.tokenizer_source:
        doc["tokenizer_source"] = mc.tokenizer_source
    return doc


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def layer_position(name: str, n_layers: int) -> float:
    """Where a tensor sits in depth, in [0, 1]: layer i of n at i/(n-1); tensors
    outside the layer stack (embeddings at 0, final norm and head at 1)."""
    m = _LAYER.search(name)
    if m:
        return int(m.group(1)) / max(n_layers - 1, 1)
    return 0.0 if "embed" in name else 1.0


def resolve(value, name: str, n_layers: int, where: str):
    """The value of one parameter for tensor ``name``: scalar, gradient or filters."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for entry in value:
            unknown = set(entry) - {"filter", "value"}
            if unknown or "value" not in entry:
                raise ConfigError(f"{where}: filter entries are {{filter: SUBSTRING, value: V}}, got {dict(entry)}")
            if "filter" not in entry or str(entry["filter"]) in name:
                return resolve(entry["value"], name, n_layers, where)
        raise ConfigError(f"{where}: no filter matches tensor {name} and there is no default entry")
    if isinstance(value, list):
        if not value or not all(isinstance(v, (int, float)) for v in value):
            raise ConfigError(f"{where}: a gradient is a list of numbers, got {value}")
        if len(value) == 1:
            return float(value[0])
        pos = layer_position(name, n_layers) * (len(value) - 1)
        return float(np.interp(pos, np.arange(len(value)), value))
    if isinstance(value, bool) or isinstance(value, (int, float, str)):
        return value
    raise ConfigError(f"{where}: unsupported parameter value {value!r}")
