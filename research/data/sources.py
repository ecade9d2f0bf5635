"""User data: JSONL files and TFDS datasets, as random-access prompt/response sources."""

from __future__ import annotations

import json
import os


class DataError(ValueError):
    """Bad user data; the message names the file and line."""


class JsonlSource:
    """A JSONL file of ``{"prompt": ..., "response": ...}`` or ``{"text": ...}`` lines.

    ``{"text"}`` lines are trained on whole (empty prompt).  Blank lines are
    skipped; anything else that does not parse is an error naming the line.
    """

    def __init__(self, path: str, name: str | None = None):
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        self.path = path
        self.name = name or os.path.splitext(os.path.basename(path))[0]
        self._rows: list[tuple[str, str]] = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                if "prompt" in rec and "response" in rec:
                    p, r = rec["prompt"], rec["response"]
                elif "text" in rec:
                    p, r = "", rec["text"]
                else:
                    raise DataError(f"{path}:{lineno}: needs 'prompt' and 'response', or 'text'; got keys {sorted(rec)}")
                if not isinstance(p, str) or not isinstance(r, str):
                    raise DataError(f"{path}:{lineno}: 'prompt'/'response'/'text' must be strings")
                if not (p or r):
                    raise DataError(f"{path}:{lineno}: empty sample")
                self._rows.append((p, r))
        if not self._rows:
            raise DataError(f"{path}: no samples")

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, i: int) -> tuple[str, str]:
        return self._rows[i]


class TfdsSource:
    """A TFDS dataset by name through ``tfds.data_source`` (random access, no TF graph).

    ``prompt_key``/``response_key`` pick the fields; with only ``text_key`` the
    whole text is the response.
    """

    def __init__(self, name: str, split: str = "train", *, text_key: str = "text", prompt_key: str | None = None,
                 response_key: str | None = None, data_dir: str | None = None):
        import tensorflow_datasets as tfds

        self.name = name
        self._src = tfds.data_source(name, split=split, data_dir=data_dir)
        self._keys = (prompt_key, response_key or text_key)

    def __len__(self):
        return len(self._src)

    def __getitem__(self, i: int) -> tuple[str, str]:
        rec = self._src[i]
        pk, rk = self._keys
        dec = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
        if rk not in rec:
            raise DataError(f"TFDS {self.name}[{i}]: no field {rk!r}; fields: {sorted(rec)}")
        return (dec(rec[pk]) if pk else ""), dec(rec[rk])
