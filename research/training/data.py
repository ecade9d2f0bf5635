"""What a ``TrainConfig`` trains on: its tokenizer, chat template, sources and mixture.

* **Tokenizer** (``tokenizer``): ``"byte"``, a SentencePiece ``.model``, a
  ``tokenizer.json`` or a directory holding one.  Unset, it is the tokenizer
  of an HF ``init_from`` directory when that holds one, else ``"byte"``.  Its
  vocabulary must fit the model's embedding rows.
* **Sources** (``data``): specs of ``research.data.sources``, each optionally
  ``(spec, weight)``; empty ``data`` means the embedded ``tasks``.  With any
  weight given, the mixture is those weights (1 for an entry without one);
  otherwise ``mixing`` (``"size"``/``"temperature"``/``{name: weight}``)
  applies to the sources' training sizes.
* **Templates**: ``prompt_template`` formats the prompts of user
  prompt/response records; ``chat_template`` (a Jinja string, or a path to a
  ``.jinja`` file) renders ``messages`` records, by default the tokenizer's
  own template, else ``research.data.templates.DEFAULT_CHAT_TEMPLATE``.
"""

from __future__ import annotations

import os

from research.data import sources as sources_lib, tokenizers
from research.data.templates import ChatTemplate, TemplateError
from research.training.config import ConfigError, TrainConfig


def hf_init_dir(cfg: TrainConfig) -> str | None:
    """``init_from`` when it is an HF directory (it holds ``config.json``)."""
    if cfg.init_from and os.path.isfile(os.path.join(cfg.init_from, "config.json")):
        return cfg.init_from
    return None


def tokenizer_spec(cfg: TrainConfig) -> str:
    if cfg.tokenizer is not None:
        return cfg.tokenizer
    hf = hf_init_dir(cfg)
    return hf if hf and tokenizers.hf_tokenizer_file(hf) else "byte"


def tokenizer_for(cfg: TrainConfig, vocab_rows: int | None = None):
    """The run's tokenizer; a vocabulary larger than ``vocab_rows`` is a ``ConfigError``."""
    spec = tokenizer_spec(cfg)
    try:
        tok = tokenizers.load(spec)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"tokenizer={spec!r}: {e}") from None
    if vocab_rows is not None and tok.vocab_size > vocab_rows:
        raise ConfigError(f"tokenizer={spec!r} has {tok.vocab_size} ids but the model has {vocab_rows} embedding "
                          "rows; use the model's own tokenizer, or a model (vocab_size) that fits it")
    return tok


def chat_for(cfg: TrainConfig, tok) -> ChatTemplate:
    template = cfg.chat_template
    if template is not None and template.endswith(".jinja"):
        if not os.path.isfile(template):
            raise ConfigError(f"chat_template={template!r}: no such file")
        with open(template, encoding="utf-8") as f:
            template = f.read()
    source = f"chat_template={cfg.chat_template!r}" if template else f"the chat template of {tok.name}"
    template = template or tok.chat_template
    try:
        return ChatTemplate(template, bos_token=tok.bos_token, eos_token=tok.eos_token)
    except TemplateError as e:
        raise ConfigError(f"{source}: {e} (set chat_template= to use another)") from None


def sources_for(cfg: TrainConfig, tok) -> tuple[list, object]:
    """``(sources, mixing)`` for the pipeline; a bad source is a ``ConfigError`` naming it."""
    lengths = {t: (a, b) for t, a, b in cfg.task_lengths}
    if not cfg.data:
        return [sources_lib.open_source(t, task_lengths=lengths) for t in cfg.tasks], cfg.mixing
    chat = chat_for(cfg, tok)
    entries = sources_lib.parse_data(cfg.data)
    srcs = []
    for spec, _ in entries:
        try:
            srcs.append(sources_lib.open_source(spec, task_lengths=lengths, prompt_template=cfg.prompt_template,
                                                chat=chat))
        except sources_lib.DataError as e:
            raise ConfigError(f"data: {e}") from None
    names = [s.name for s in srcs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"data: two sources are named {dup[0]!r}; rename one (jsonl:PATH?name=NEW)")
    if any(w is not None for _, w in entries):
        mixing = {s.name: (1.0 if w is None else w) for s, (_, w) in zip(srcs, entries)}
        if not any(mixing.values()):
            raise ConfigError(f"data={cfg.data!r}: the mixture weights are all 0")
        return srcs, mixing
    if isinstance(cfg.mixing, dict):
        bad = sorted(set(cfg.mixing) - set(names))
        if bad:
            raise ConfigError(f"mixing: {bad[0]!r} is not a source name; sources: {names}")
    return srcs, cfg.mixing

