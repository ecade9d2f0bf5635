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

import os
from typing import Protocol, Sequence

from research.safetensors_io import json_object


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
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as e:  # sentencepiece raises RuntimeError or OSError on a damaged model
            raise ValueError(f"{path}: sentencepiece cannot read it ({_first_line(e)})") from None
        self.vocab_size = self._sp.get_piece_size()
        specials = specials or {}
        for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if specials.get(k) is not None and not 0 <= specials[k] < self.vocab_size:
                raise ValueError(f"{path}: {k}={specials[k]} is not an id of its {self.vocab_size}")
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


_PROBE = "copy: Hello, World!\n  0123 \u00e9\u4e2d\U0001f600\t"  # words, digits, spaces, accents, CJK, emoji


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
        try:  # a damaged file may load and then fail on its first text: tried here, where it can be named
            self._tok = _Tok.from_file(path)
            self._tok.decode(self._tok.encode(_PROBE, add_special_tokens=False).ids)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # a bare Exception on a damaged file, or a Rust panic (pyo3's PanicException)
            raise ValueError(f"{path}: the tokenizers library cannot read it or encode with it "
                             f"({_first_line(e)})") from None
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


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _token_str(v, where: str, key: str):
    """A special token as ``tokenizer_config.json`` writes it: a string or ``{"content": ...}``."""
    t = v.get("content") if isinstance(v, dict) else v
    if t is not None and not isinstance(t, str):
        raise ValueError(f"{where}: {key}={v!r}: expected a token string or {{\"content\": string}}")
    return t


def _read_json(path: str) -> dict:
    """A JSON file's object (``json_object``: a ``CheckpointError``, which is a
    ``ValueError``, naming a file that holds anything else); ``{}`` where there
    is no such file."""
    return json_object(path) if os.path.isfile(path) else {}


def _token_id(v, where: str, key: str) -> int:
    """An id as configs write it: an integer, or a list of them (the first is taken)."""
    i = v[0] if isinstance(v, list) and v else v
    if type(i) is not int or i < 0:
        raise ValueError(f"{where}: {key}={v!r}: expected a token id")
    return i


def hf_specials(directory: str) -> dict:
    """``bos_token``/``eos_token``/``pad_token`` (strings), ``add_bos_token`` and
    ``chat_template`` of an HF model directory, read as transformers reads them.
    A value of the wrong type is a ``ValueError`` naming the file and key."""
    path = lambda name: os.path.join(directory, name)
    tc, sm = _read_json(path("tokenizer_config.json")), _read_json(path("special_tokens_map.json"))
    ids = [(name, {k: v for k, v in _read_json(path(name)).items() if v is not None})
           for name in ("config.json", "generation_config.json")]
    out = {}
    for k in ("bos_token", "eos_token", "pad_token"):
        v = (_token_str(tc.get(k), path("tokenizer_config.json"), k)
             or _token_str(sm.get(k), path("special_tokens_map.json"), k))
        if v:
            out[k] = v
            continue
        for name, cfg in reversed(ids):  # only an id: generation_config.json's, else config.json's
            if f"{k}_id" in cfg:
                out[f"{k}_id"] = _token_id(cfg[f"{k}_id"], path(name), f"{k}_id")
                break
    add_bos, cls = tc.get("add_bos_token"), tc.get("tokenizer_class") or ""
    if add_bos is not None and not isinstance(add_bos, bool):
        raise ValueError(f"{path('tokenizer_config.json')}: add_bos_token={add_bos!r}: expected true or false")
    if not isinstance(cls, str):
        raise ValueError(f"{path('tokenizer_config.json')}: tokenizer_class={cls!r}: expected a class name")
    # Llama/Mistral/Gemma tokenizers add BOS by default (LlamaTokenizer's add_bos_token=True)
    out["add_bos_token"] = add_bos if add_bos is not None else (
        ("bos_token" in out or "bos_token_id" in out) and cls.startswith(("Llama", "Gemma", "Mistral")))
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
    where = os.path.join(directory, "tokenizer_config.json")
    if tokenizer_config is None:
        tokenizer_config = _read_json(where)
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        if not all(isinstance(t, dict) for t in template):
            raise ValueError(f"{where}: chat_template: expected a string or a list of {{\"name\", \"template\"}}")
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{where}: chat_template={template!r:.60}: expected a Jinja template string")
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
