"""What a merge writes beside its tensors: ``config.json`` (its dtype, depth and
whether the head is tied, as the output has them), the tokenizer files with
the chat template the config asks for, and a rerunnable ``merge_config.yaml``.

The tokenizer files (``config.TOKENIZER_FILES``) are copied from
``tokenizer_source`` where the config gives one, else from the first input's
directory (the base's, where there is one).  A ``chat_template`` replaces
theirs: in ``chat_template.jinja`` where they have that file (transformers'
format since 2025) and in ``tokenizer_config.json``'s ``chat_template``
field, or in a new ``chat_template.jinja`` where they have neither.
``chat_template: auto`` takes the template most inputs have (the first
input's among equals), as mergekit does.
"""

from __future__ import annotations

import collections
import json
import os
import shutil

import jax.numpy as jnp
import yaml

from research.data.tokenizers import chat_template as read_chat_template
from research.merging.stream import config as cfg_lib
from research.merging.stream.sources import HEAD
from research.safetensors_io import CheckpointError, json_object


class MetadataError(ValueError):
    pass


def _directory(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(path)


def tokenizer_dir(mc, first_input: str) -> str:
    """Where the output's tokenizer files come from."""
    return _directory(mc.tokenizer_source or first_input)


def check_tokenizer(mc, inputs: list[str], vocab_rows: set) -> str | None:
    """Checks the config's tokenizer choices before any tensor is read; returns the
    output's chat template (None: the tokenizer files' own).  ``inputs``: the
    inputs' paths, the first input's first; ``vocab_rows``: the row counts of
    the merged embeddings."""
    tok_dir = tokenizer_dir(mc, inputs[0])
    has_files = any(os.path.isfile(os.path.join(tok_dir, f)) for f in cfg_lib.TOKENIZER_FILES)
    if mc.tokenizer_source:
        if not has_files:
            raise MetadataError(f"{mc.source}: tokenizer_source {mc.tokenizer_source}: no tokenizer files there "
                                f"({', '.join(cfg_lib.TOKENIZER_FILES)})")
        cj = os.path.join(tok_dir, "config.json")
        if os.path.isfile(cj):
            vocab = json_object(cj).get("vocab_size")
            if vocab and vocab_rows and vocab not in vocab_rows:
                raise MetadataError(f"{mc.source}: tokenizer_source {mc.tokenizer_source} has vocab_size {vocab}, but "
                                    f"the merged embeddings have {sorted(vocab_rows)} rows; its tokenizer would not "
                                    "fit them")
    if mc.chat_template is None:
        return None
    if not has_files:
        raise MetadataError(f"{mc.source}: chat_template: the output gets no tokenizer files ({tok_dir} has none), "
                            "so the template would belong to no tokenizer")
    tc = os.path.join(tok_dir, "tokenizer_config.json")
    if os.path.isfile(tc):  # the template goes in there
        try:
            json_object(tc)
        except CheckpointError as e:
            raise MetadataError(f"{mc.source}: chat_template: {e}") from None
    if mc.chat_template != "auto":
        return mc.chat_template
    found = []
    for d in dict.fromkeys(_directory(p) for p in inputs):
        try:
            text = read_chat_template(d)
        except ValueError as e:
            raise MetadataError(f"{mc.source}: chat_template: auto: {e}") from None
        if text:
            found.append(text.strip())
    return collections.Counter(found).most_common(1)[0][0] if found else None


def write(plan, mc, tmp: str, out_dtype, first, template: str | None, header: str) -> None:
    """Writes the metadata files into the output directory ``tmp``.  ``first``: the
    first input's ``TensorSource``; ``header``: the comment atop merge_config.yaml."""
    cj = first.config_json()
    if cj:
        config = json_object(cj)
        if "num_hidden_layers" in config:  # slices may give the output another depth
            config["num_hidden_layers"] = plan.n_layers
        if config.get("tie_word_embeddings") and HEAD in plan.names:  # a head of its own (sources.untie_head)
            config["tie_word_embeddings"] = False
        if out_dtype is not None:
            name = str(jnp.dtype(out_dtype))
            config["torch_dtype"] = name
            if "dtype" in config:
                config["dtype"] = name
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    tok_dir = tokenizer_dir(mc, first.path)
    for fname in cfg_lib.TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tok_dir, fname)):
            shutil.copyfile(os.path.join(tok_dir, fname), os.path.join(tmp, fname))
    if template is not None:
        _set_chat_template(tmp, template)
    with open(os.path.join(tmp, "merge_config.yaml"), "w") as f:
        f.write(header + "\n")
        yaml.safe_dump(cfg_lib.rerunnable(mc), f, sort_keys=False)


def _set_chat_template(out: str, template: str) -> None:
    jinja, tc_path = os.path.join(out, "chat_template.jinja"), os.path.join(out, "tokenizer_config.json")
    if os.path.isfile(tc_path):
        tc = json_object(tc_path)
        tc["chat_template"] = template
        with open(tc_path, "w", encoding="utf-8") as f:
            json.dump(tc, f, indent=2, ensure_ascii=False)
    if os.path.isfile(jinja) or not os.path.isfile(tc_path):
        with open(jinja, "w", encoding="utf-8") as f:
            f.write(template)
