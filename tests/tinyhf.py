"""Offline stand-ins for a user's files: a BPE ``tokenizer.json`` trained here, a
random tiny Llama HF directory that uses it, and JSONL data files."""

from __future__ import annotations

import json
import os
import random

CHAT_TEMPLATE = (  # a Llama-2-style template, as tokenizer_config.json files carry them
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)


def train_bpe(path: str, vocab_size: int = 320) -> None:
    """A byte-level BPE ``tokenizer.json`` with ``<pad>``, ``<s>`` and ``</s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    text = [" ".join("".join(rng.choices("abcdefghij", k=rng.randint(2, 6))) for _ in range(8)) for _ in range(300)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text + ["reverse: ", "copy: ", "[INST]", "[/INST]"], trainer)
    tok.save(path)


def write_tiny_llama(directory: str, *, n_layers: int = 2, seed: int = 0, chat_template: bool = True) -> int:
    """A random Llama-shaped HF directory with its own BPE tokenizer; returns the vocabulary size."""
    from flax import nnx

    from research.models import Transformer, preset, save_hf

    os.makedirs(directory, exist_ok=True)
    tmp_tok = os.path.join(os.path.dirname(os.path.abspath(directory)), f".{os.path.basename(directory)}.tok.json")
    train_bpe(tmp_tok)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(tmp_tok).get_vocab_size()
    cfg = preset("tiny", vocab_size=vocab, n_layers=n_layers, tie_embeddings=False)
    save_hf(Transformer(cfg, rngs=nnx.Rngs(seed)), directory, force=True)
    os.replace(tmp_tok, os.path.join(directory, "tokenizer.json"))
    tc = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True,
          "tokenizer_class": "LlamaTokenizerFast"}
    if chat_template:
        tc["chat_template"] = CHAT_TEMPLATE
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f)
    return vocab


def write_jsonl(path: str, op: str, n: int = 200, seed: int = 0) -> None:
    """``n`` prompt/response records of a string operation (``reverse`` or ``copy``)."""
    rng = random.Random(seed)
    fn = {"reverse": lambda s: s[::-1], "copy": lambda s: s}[op]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            s = "".join(rng.choices("abcdefghij", k=rng.randint(3, 6)))
            f.write(json.dumps({"prompt": f"{op}: {s}\n", "response": fn(s)}) + "\n")
