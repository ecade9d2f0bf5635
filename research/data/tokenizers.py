"""Tokenizers: a byte-level default that needs no files, or a local SentencePiece
model / Hugging Face ``tokenizer.json``.  Nothing is ever downloaded.

All share one small interface: ``encode(str) -> list[int]``,
``decode(list[int]) -> str``, ``vocab_size``, ``pad_id``, ``eos_id``,
``bos_id`` (``None`` when there is none), ``add_bos`` (whether a sequence
starts with BOS), ``bos_token``/``eos_token`` (their strings, for chat
templates; empty for the byte tokenizer) and ``chat_template`` (a Jinja
template or ``None``).

Special tokens of an HF directory are read the way transformers reads them:
``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``pad_token``,
``add_bos_token``, ``chat_template``, which ``chat_template.jinja`` overrides),
then ``special_tokens_map.json``, then
the ids in ``config.json`` / ``generation_config.json``.  A missing PAD falls
back to EOS (pad positions are masked out everywhere).

    tok = load("byte")                      # 259 ids: 0 PAD, 1 EOS, 2 BOS, then bytes
    tok = load("path/to/hf_model_dir")      # its tokenizer.json (or tokenizer.model)
    ids = encode_sequence(tok, "Hello")     # with BOS first when tok.add_bos
"""

from __future__ import annotations

import json
import os
from typing import Protocol, Sequence


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int | None
    add_bos: bool
    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes shifted past three specials: 0 = PAD, 1 = EOS, 2 = BOS (not added)."""

    pad_id, eos_id, bos_id = 0, 1, 2
    add_bos = False
    bos_token = eos_token = ""
    chat_template = None
    offset = 3
    vocab_size = 256 + offset
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A local SentencePiece ``.model`` file."""

    chat_template = None

    def __init__(self, path: str, specials: dict | None = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        import sentencepiece as spm

        self.name = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()
        specials = specials or {}
        ids = lambda tok: self._sp.piece_to_id(tok) if tok and self._sp.piece_to_id(tok) != self._sp.unk_id() else None
        eos = ids(specials.get("eos_token"))
        eos = eos if eos is not None else specials.get("eos_token_id")
        self.eos_id = eos if eos is not None else self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"SentencePiece model {path} defines no EOS piece")
        bos = ids(specials.get("bos_token"))
        bos = bos if bos is not None else specials.get("bos_token_id")
        self.bos_id = bos if bos is not None else (self._sp.bos_id() if self._sp.bos_id() >= 0 else None)
        self.add_bos = bool(specials.get("add_bos_token", False)) and self.bos_id is not None
        pad = ids(specials.get("pad_token"))
        pad = pad if pad is not None else specials.get("pad_token_id")
        self.pad_id = pad if pad is not None else (self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id)
        self.eos_token = self._sp.id_to_piece(self.eos_id)
        self.bos_token = self._sp.id_to_piece(self.bos_id) if self.bos_id is not None else ""

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` (the ``tokenizers`` library).

    Special tokens in the text (``<|im_start|>``, ``</s>``) encode to their ids,
    as transformers does; ``encode`` never adds BOS/EOS itself.
    """

    def __init__(self, path: str, eos_token: str | None = None, pad_token: str | None = None,
                 specials: dict | None = None):
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        from tokenizers import Tokenizer as _Tok

        self.name = path
        self._tok = _Tok.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        specials = dict(specials or {})
        eos_candidates = [eos_token or specials.get("eos_token")] if (eos_token or specials.get("eos_token")) else \
            ["</s>", "<|endoftext|>", "<eos>", "[SEP]", "<|end_of_text|>"]
        by_id = {i: t for t, i in vocab.items()}
        eos = next((t for t in eos_candidates if t in vocab), None)
        if specials.get("eos_token_id") in by_id and not specials.get("eos_token") and not eos_token:
            eos = by_id[specials["eos_token_id"]]
        if eos is None:
            raise ValueError(f"{path}: no EOS token among {eos_candidates}; pass eos_token= or set eos_token in "
                             "tokenizer_config.json")
        self.eos_id, self.eos_token = vocab[eos], eos
        bos = specials.get("bos_token") or by_id.get(specials.get("bos_token_id"))
        if bos is not None and bos not in vocab:
            raise ValueError(f"{path}: bos_token {bos!r} is not in the vocabulary")
        self.bos_id, self.bos_token = (vocab[bos], bos) if bos else (None, "")
        self.add_bos = bool(specials.get("add_bos_token", False)) and self.bos_id is not None
        pad = pad_token or specials.get("pad_token") or by_id.get(specials.get("pad_token_id")) or \
            next((t for t in ("<pad>", "[PAD]", "<|pad|>") if t in vocab), None)
        if pad is not None and pad not in vocab:
            raise ValueError(f"{path}: pad_token {pad!r} is not in the vocabulary")
        self.pad_id = vocab[pad] if pad else self.eos_id
        self.chat_template = specials.get("chat_template")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def encode_sequence(tok: Tokenizer, text: str) -> list[int]:
    """``text`` as the start of a sequence: BOS first when the tokenizer adds one
    (and the text does not already begin with it, as a chat template's may)."""
    ids = tok.encode(text)
    if tok.add_bos and not (ids and ids[0] == tok.bos_id):
        ids = [tok.bos_id, *ids]
    return ids


def _token_str(v):
    """A special token as ``tokenizer_config.json`` writes it: a string or ``{"content": ...}``."""
    return v.get("content") if isinstance(v, dict) else v


def _read_json(path: str) -> dict:
    """A JSON file's contents; ``{}`` where there is no such file."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def hf_specials(directory: str) -> dict:
    """``bos_token``/``eos_token``/``pad_token`` (strings), ``add_bos_token`` and
    ``chat_template`` of an HF model directory, read as transformers reads them."""
    read = lambda name: _read_json(os.path.join(directory, name))
    tc, sm = read("tokenizer_config.json"), read("special_tokens_map.json")
    model_cfg = {**read("config.json"), **{k: v for k, v in read("generation_config.json").items() if v is not None}}
    out = {}
    for k in ("bos_token", "eos_token", "pad_token"):
        v = _token_str(tc.get(k)) or _token_str(sm.get(k))
        if v:
            out[k] = v
        elif model_cfg.get(f"{k}_id") is not None:  # only an id: the model's config.json / generation_config.json
            i = model_cfg[f"{k}_id"]
            out[f"{k}_id"] = int(i[0] if isinstance(i, list) else i)
    # Llama/Mistral/Gemma tokenizers add BOS by default (LlamaTokenizer's add_bos_token=True)
    out["add_bos_token"] = tc.get("add_bos_token", ("bos_token" in out or "bos_token_id" in out) and
                                  tc.get("tokenizer_class", "").startswith(("Llama", "Gemma", "Mistral")))
    template = chat_template(directory, tc)
    if template:
        out["chat_template"] = template
    return out


def chat_template(directory: str, tokenizer_config: dict | None = None) -> str | None:
    """The default chat template of an HF directory, as transformers reads it:
    ``chat_template.jinja`` where there is one (transformers' format since
    2025), else ``tokenizer_config.json``'s ``chat_template`` (a string, or
    ``[{"name", "template"}]`` whose ``default`` entry is taken).
    ``tokenizer_config``: that file's contents, where the caller has read them."""
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    if tokenizer_config is None:
        tokenizer_config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template or None


def hf_tokenizer_file(directory: str) -> str | None:
    """The tokenizer file of an HF directory: ``tokenizer.json``, else ``tokenizer.model``."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def load(spec: str | None = None) -> Tokenizer:
    """``None``/``"byte"`` -> ByteTokenizer; a ``.model`` path -> SentencePiece;
    a ``tokenizer.json`` path, or a directory holding one (or a ``tokenizer.model``)
    -> that tokenizer, with the special tokens of the directory's configs."""
    if spec in (None, "byte"):
        return ByteTokenizer()
    directory = spec if os.path.isdir(spec) else os.path.dirname(spec) or "."
    if os.path.isdir(spec):
        found = hf_tokenizer_file(spec)
        if found is None:
            raise FileNotFoundError(f"tokenizer {spec!r}: the directory holds no tokenizer.json or tokenizer.model")
        spec = found
    specials = hf_specials(directory)
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec, specials)
    if spec.endswith(".json"):
        return HFTokenizer(spec, specials=specials)
    raise FileNotFoundError(f"tokenizer {spec!r}: expected 'byte', a SentencePiece .model or a tokenizer.json")
