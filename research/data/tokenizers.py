"""Tokenizers: a byte-level default that needs no files, or a local SentencePiece
model / Hugging Face ``tokenizer.json``.  Nothing is ever downloaded.

All share one small interface: ``encode(str) -> list[int]``,
``decode(list[int]) -> str``, ``vocab_size``, ``pad_id``, ``eos_id``.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes shifted past three specials: 0 = PAD, 1 = EOS, 2 = BOS."""

    pad_id, eos_id, bos_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A local SentencePiece ``.model`` file."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()
        self.pad_id = max(self._sp.pad_id(), 0)
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"SentencePiece model {path} defines no EOS piece")

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` (the ``tokenizers`` library)."""

    def __init__(self, path: str, eos_token: str | None = None, pad_token: str | None = None):
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(path)
        self.vocab_size = self._tok.get_vocab_size()
        vocab = self._tok.get_vocab()
        eos_candidates = [eos_token] if eos_token else ["</s>", "<|endoftext|>", "<eos>", "[SEP]", "<|end_of_text|>"]
        eos = next((t for t in eos_candidates if t in vocab), None)
        if eos is None:
            raise ValueError(f"{path}: no EOS token among {eos_candidates}; pass eos_token=")
        self.eos_id = vocab[eos]
        pad = pad_token or next((t for t in ("<pad>", "[PAD]", "<|pad|>") if t in vocab), None)
        self.pad_id = vocab[pad] if pad else 0

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def load(spec: str | None = None) -> Tokenizer:
    """``None``/``"byte"`` -> ByteTokenizer; a ``.model`` path -> SentencePiece;
    a ``tokenizer.json`` path (or a directory holding one) -> HF tokenizers."""
    if spec in (None, "byte"):
        return ByteTokenizer()
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    if spec.endswith(".json") or os.path.isdir(spec):
        return HFTokenizer(spec)
    raise FileNotFoundError(f"tokenizer {spec!r}: expected 'byte', a SentencePiece .model or a tokenizer.json")
