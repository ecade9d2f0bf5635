"""Training data sources: one protocol for the embedded tasks, the text corpus,
JSONL files and TFDS datasets.

Every source has a ``name``, a ``size`` (``{split: examples}``, or ``None``
for an unbounded generated task), ``generative`` (whether its examples have
references to score by exact match) and ``example(split, index) -> (prompt,
response)`` over the splits ``train``, ``val`` and ``test``.  The loss is on
the response; a text-only example has an empty prompt.

A config names sources by spec (``TrainConfig.data``)::

    copy                                  an embedded task (research.data.tasks)
    text                                  the embedded English corpus (research.data.text)
    jsonl:data/train.jsonl                {"prompt","response"}, {"text"} or {"messages"} lines
    jsonl:qa.jsonl?prompt=question&response=answer&val=qa_val.jsonl
    tfds:imdb_reviews:train?text=text     a TFDS dataset (random access, tfds.data_source)
    tfds:squad?prompt=question&response=answers/text&eval_split=validation

Options (after ``?``, joined by ``&``): ``prompt``, ``response``, ``text``
and ``messages`` name the record fields (``a/b`` reaches into nested
records, and the first element of a list); ``name`` renames the source;
``val`` (JSONL) is a separate held-out file; ``eval_split`` (TFDS) is the
dataset split to evaluate on.

Held-out splits are disjoint from training.  A JSONL file without ``val=``
is split by a hash of each record's content (5% ``val``, 5% ``test``, the
rest ``train``, as the embedded tasks are), so a record repeated in the file
lands in one split only.  With ``val=FILE``, its records that also occur in
the training file are dropped from it.  A TFDS source evaluates on
``eval_split``, by default the dataset's ``validation`` (else ``test``)
split; without either, it holds out 5% of the training split by a hash of
the index.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from typing import Protocol

from research.data import tasks as tasks_lib
from research.data.templates import ChatTemplate, TemplateError, apply_prompt


class DataError(ValueError):
    """Bad user data or a bad source spec; the message names the file and line."""


class Source(Protocol):
    name: str
    generative: bool
    size: dict | None

    def example(self, split: str, index: int) -> tuple[str, str]: ...


_FIELD_OPTIONS = ("prompt", "response", "text", "messages")


def _field(rec, path: str):
    """``rec["a"]["b"]`` for ``"a/b"``; a list is entered at its first element."""
    v = rec
    for part in path.split("/"):
        if isinstance(v, (list, tuple)) and v:
            v = v[0]
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    if isinstance(v, (list, tuple)) and v and not isinstance(v[0], dict):
        v = v[0]
    return v


def _split_rows(rows: list) -> dict:
    """The embedded tasks' hash split, over each record's canonical JSON."""
    out = {s: [] for s in tasks_lib.SPLITS}
    for key, row in rows:
        out[tasks_lib.split_of("user-data", key)].append(row)
    return out


class JsonlSource:
    """A JSONL file of ``{"prompt", "response"}``, ``{"text"}`` or chat
    ``{"messages": [{"role", "content"}, ...]}`` lines.

    ``{"text"}`` lines are trained on whole (empty prompt).  A conversation
    is rendered by ``chat`` (``research.data.templates``) and trains on its
    last assistant message.  Blank lines are skipped; anything else that does
    not parse, or has no usable field, is an error naming the file and line.
    """

    def __init__(self, path: str, name: str | None = None, *, fields: dict | None = None, val: str | None = None,
                 prompt_template: str = "{prompt}", chat: ChatTemplate | None = None):
        self.path = path
        self.name = name or os.path.splitext(os.path.basename(path))[0]
        self._fields = {k: (fields or {}).get(k, k) for k in _FIELD_OPTIONS}
        self._template, self._chat = prompt_template, chat
        rows = self._read(path)
        if val is None:
            self._rows = _split_rows(rows)
        else:
            held = self._read(val)
            train_keys = {k for k, _ in rows}
            self._rows = {"train": [r for _, r in rows], "val": [r for k, r in held if k not in train_keys], "test": []}
        if not self._rows["train"]:
            raise DataError(f"{path}: no training samples (of {len(rows)} records, all were held out)")
        self.size = {s: len(r) for s, r in self._rows.items()}
        self.generative = all(p for p, _ in self._rows["train"])

    def _read(self, path: str) -> list:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        rows = []
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
                try:
                    row = self._row(rec)
                except (DataError, TemplateError) as e:
                    raise DataError(f"{path}:{lineno}: {e}") from None
                rows.append((json.dumps(rec, sort_keys=True, ensure_ascii=False), row))
        if not rows:
            raise DataError(f"{path}: no samples")
        return rows

    def _row(self, rec: dict) -> tuple[str, str]:
        f = self._fields
        prompt, response, text, messages = (_field(rec, f[k]) for k in _FIELD_OPTIONS)
        if messages is not None:
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise DataError(f"{f['messages']!r} must be a list of {{'role': str, 'content': str}} objects")
            return (self._chat or ChatTemplate()).split(messages)
        if prompt is not None and response is not None:
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise DataError(f"{f['prompt']!r} and {f['response']!r} must be strings")
            if not response:
                raise DataError(f"empty {f['response']!r}")
            return apply_prompt(self._template, prompt), response
        if text is not None:
            if not isinstance(text, str) or not text:
                raise DataError(f"{f['text']!r} must be a non-empty string")
            return "", text
        nulls = [f[k] for k in _FIELD_OPTIONS if f[k] in rec and rec[f[k]] is None]
        raise DataError(f"needs {f['prompt']!r} and {f['response']!r}, or {f['text']!r}, or {f['messages']!r}; "
                        f"got keys {sorted(rec)}" + "".join(f" ({k!r} is null)" for k in nulls))

    def example(self, split: str, index: int) -> tuple[str, str]:
        tasks_lib._check_split(split)
        rows = self._rows[split]
        if not rows:
            raise DataError(f"source {self.name!r} ({self.path}) has no {split!r} examples")
        return rows[index % len(rows)]


class TfdsSource:
    """A TFDS dataset by name through ``tfds.data_source`` (random access, no TF graph).

    ``prompt_key``/``response_key`` pick the fields; with only ``text_key`` the
    whole text is the response.  ``split`` is the training split;
    ``eval_split`` the held-out one (see the module docstring).
    """

    def __init__(self, name: str, split: str = "train", *, text_key: str = "text", prompt_key: str | None = None,
                 response_key: str | None = None, data_dir: str | None = None, eval_split: str | None = None,
                 source_name: str | None = None, prompt_template: str = "{prompt}"):
        import tensorflow_datasets as tfds

        self.name = source_name or name
        self._dataset, self._template = name, prompt_template
        self._keys = (prompt_key, response_key or text_key)
        self._train = tfds.data_source(name, split=split, data_dir=data_dir)
        if eval_split is None:
            splits = set(tfds.builder(name, data_dir=data_dir).info.splits)
            eval_split = next((s for s in ("validation", "test") if s in splits and s != split), None)
        self._held = tfds.data_source(name, split=eval_split, data_dir=data_dir) if eval_split else None
        if self._held is None:  # hold out 5% + 5% of the training split, by index
            parts = {s: [] for s in tasks_lib.SPLITS}
            for i in range(len(self._train)):
                parts[tasks_lib.split_of(name, str(i))].append(i)
            self._index = parts
            self.size = {s: len(v) for s, v in parts.items()}
        else:
            self._index = None
            self.size = {"train": len(self._train), "val": len(self._held), "test": 0}
        self.generative = prompt_key is not None

    def _record(self, src, i: int) -> tuple[str, str]:
        rec = src[i]
        pk, rk = self._keys
        dec = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
        out = []
        for k in (pk, rk):
            if k is None:
                out.append("")
                continue
            v = _field(rec, k)
            if v is None:
                raise DataError(f"TFDS {self._dataset}[{i}]: no field {k!r}; fields: {sorted(rec)}")
            out.append(dec(v))
        return (apply_prompt(self._template, out[0]) if pk else ""), out[1]

    def example(self, split: str, index: int) -> tuple[str, str]:
        tasks_lib._check_split(split)
        if self._index is not None:
            idx = self._index[split]
            if not idx:
                raise DataError(f"TFDS source {self.name!r} has no {split!r} examples")
            return self._record(self._train, idx[index % len(idx)])
        if split == "train":
            return self._record(self._train, index % len(self._train))
        if split == "test" or not len(self._held):
            raise DataError(f"TFDS source {self.name!r} has no {split!r} examples (its held-out split is 'val')")
        return self._record(self._held, index % len(self._held))


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """``"kind:rest?k=v&k=v"`` -> ``(kind, rest, options)``; a bare name is ``("task", name, {})``."""
    if not isinstance(spec, str) or not spec:
        raise DataError(f"a data source is a non-empty string spec, got {spec!r}")
    kind, sep, rest = spec.partition(":")
    if not sep:
        return "task", spec, {}
    rest, _, query = rest.partition("?")
    options = {}
    for part in filter(None, query.split("&")):
        k, eq, v = part.partition("=")
        if not eq or not v:
            raise DataError(f"data source {spec!r}: option {part!r} is not key=value")
        options[k] = urllib.parse.unquote(v)
    allowed = {"jsonl": {*_FIELD_OPTIONS, "name", "val"}, "tfds": {*_FIELD_OPTIONS[:3], "name", "eval_split", "data_dir"}}
    if kind not in allowed:
        raise DataError(f"data source {spec!r}: unknown kind {kind!r}; use an embedded task name, jsonl:PATH or "
                        "tfds:NAME[:SPLIT]")
    bad = set(options) - allowed[kind]
    if bad:
        raise DataError(f"data source {spec!r}: unknown option(s) {sorted(bad)} for {kind}; "
                        f"allowed: {sorted(allowed[kind])}")
    if not rest:
        raise DataError(f"data source {spec!r}: no {'path' if kind == 'jsonl' else 'dataset name'} after '{kind}:'")
    return kind, rest, options


def open_source(spec: str, *, task_lengths: dict | None = None, prompt_template: str = "{prompt}",
                chat: ChatTemplate | None = None) -> Source:
    """The source a spec names (see the module docstring)."""
    kind, rest, opt = parse_spec(spec)
    if kind == "task":
        a_b = (task_lengths or {}).get(rest)
        try:
            return tasks_lib.make_task(rest, **({"min_len": a_b[0], "max_len": a_b[1]} if a_b else {}))
        except tasks_lib.UnknownTaskError as e:
            raise DataError(f"data source {spec!r}: {e}; or use jsonl:PATH / tfds:NAME") from None
    if kind == "jsonl":
        fields = {k: opt[k] for k in _FIELD_OPTIONS if k in opt}
        return JsonlSource(rest, opt.get("name"), fields=fields, val=opt.get("val"), prompt_template=prompt_template,
                           chat=chat)
    name, _, split = rest.partition(":")
    return TfdsSource(name, split or "train", text_key=opt.get("text", "text"), prompt_key=opt.get("prompt"),
                      response_key=opt.get("response"), data_dir=opt.get("data_dir"),
                      eval_split=opt.get("eval_split"), source_name=opt.get("name"), prompt_template=prompt_template)


def parse_data(entries) -> list[tuple[str, float | None]]:
    """``TrainConfig.data`` -> ``[(spec, weight or None)]``: each entry a spec or ``(spec, weight)``."""
    out = []
    for e in entries:
        if isinstance(e, str):
            out.append((e, None))
        elif isinstance(e, (tuple, list)) and len(e) == 2 and isinstance(e[0], str) and \
                isinstance(e[1], (int, float)) and not isinstance(e[1], bool):
            if e[1] < 0:
                raise DataError(f"data entry {e!r}: a mixture weight must be >= 0")
            out.append((e[0], float(e[1])))
        else:
            raise DataError(f"data entry {e!r}: expected a spec string or (spec, weight)")
        parse_spec(out[-1][0])
    return out
