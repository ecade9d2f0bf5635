"""``SafetensorsFile``: ``read`` copies a tensor out of the file, ``view`` maps it;
both give the same array, and neither can change or outlive a broken file quietly."""

import errno
import json
import mmap
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors
from hypothesis import HealthCheck, event, given, settings, strategies as st
from safetensors.numpy import save_file

from research import safetensors_io
from research.safetensors_io import SafetensorsError, SafetensorsFile

BF16 = ml_dtypes.bfloat16


def _mapped(a: np.ndarray) -> bool:
    while isinstance(a, np.ndarray):
        a = a.base
    return isinstance(a, memoryview) and isinstance(a.obj, mmap.mmap)


@pytest.fixture
def file(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"big": rng.standard_normal((600, 1024)).astype(BF16),  # 1.2 MB: mapped
               "small": rng.standard_normal((7, 5)).astype(np.float32)}
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path)
    return path, tensors


def test_view_maps_the_tensor_read_copies_and_they_agree(file):
    path, tensors = file
    f = SafetensorsFile(path)
    for name, want in tensors.items():
        for rows in (None, (0, 3), (5, 7)) + (((40, 580),) if name == "big" else ()):
            expect = want if rows is None else want[rows[0]:rows[1]]
            got_read, got_view = f.read(name, rows), f.view(name, rows)
            assert got_read.dtype == got_view.dtype == want.dtype
            np.testing.assert_array_equal(got_read, expect)
            np.testing.assert_array_equal(got_view, expect)
            assert not _mapped(got_read) and got_read.ctypes.data % 64 == 0
    assert _mapped(f.view("big")) and _mapped(f.view("big", (40, 580)))
    assert not _mapped(f.view("big", (0, 3)))  # 6 kB: under MAP_MIN, read
    assert not _mapped(f.view("small"))


def test_columns_read_a_strip_of_rows_as_slicing_the_flat_view_would(tmp_path):
    """``columns``: columns of rows of a tensor's ``[-1, shape[-1]]`` view, read apart from
    the rest of the rows, in an aligned array of their own; a strip past the rows,
    or a file cut short, is named."""
    rng = np.random.default_rng(1)
    tensors = {"experts": rng.standard_normal((3, 6, 20)).astype(BF16),
               "matrix": rng.standard_normal((9, 13)).astype(np.float32)}
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path)
    f = SafetensorsFile(path)
    for name, want in tensors.items():
        flat = want.reshape(-1, want.shape[-1])
        for rows, cols in [((0, 3), (0, 8)), ((4, 9), (8, 13)), ((0, len(flat)), (0, flat.shape[1])), ((2, 2), (1, 4))]:
            got = f.columns(name, rows, cols)
            np.testing.assert_array_equal(got, flat[rows[0]:rows[1], cols[0]:cols[1]])
            assert got.dtype == want.dtype and got.flags.c_contiguous and (got.ctypes.data % 64 == 0 or not got.size)
    with pytest.raises(ValueError, match=r"'matrix': columns 8:14 of rows 13 long"):
        f.columns("matrix", (0, 1), (8, 14))
    os.truncate(path, os.path.getsize(path) - sum(t.nbytes for t in tensors.values()) + 4)  # all but 4 bytes of data
    with pytest.raises(SafetensorsError, match=r"m\.safetensors.*'matrix'.*file ended"):
        f.columns("matrix", (8, 9), (0, 13))


def test_a_viewed_array_is_writable_and_writing_it_never_reaches_the_file(file):
    path, tensors = file
    before = open(path, "rb").read()
    a = SafetensorsFile(path).view("big")
    assert _mapped(a) and a.flags.writeable
    a[:] = 0
    assert open(path, "rb").read() == before
    np.testing.assert_array_equal(SafetensorsFile(path).view("big"), tensors["big"])


def test_view_reads_a_tensor_at_an_offset_not_aligned_to_its_dtype(tmp_path, monkeypatch):
    """safetensors does not require aligned offsets: a 1-byte tensor first puts the
    next float32 tensor at an odd address, which ``view`` reads rather than maps."""
    monkeypatch.setattr(safetensors_io, "MAP_MIN", 1)
    x = np.arange(300, dtype=np.float32)
    header = json.dumps({"b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                         "x": {"dtype": "F32", "shape": [300], "data_offsets": [1, 1201]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x07" + x.tobytes())
    f = SafetensorsFile(str(path))
    got = f.view("x")
    np.testing.assert_array_equal(got, x)
    assert not _mapped(got)


def test_view_reads_a_file_that_cannot_be_mapped(file, monkeypatch):
    """Some file systems (FUSE mounts among them) refuse ``mmap`` with ENODEV."""
    path, tensors = file

    def refuse(*args, **kwargs):
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(safetensors_io.mmap, "mmap", refuse)
    got = SafetensorsFile(path).view("big")
    np.testing.assert_array_equal(got, tensors["big"])
    assert got.flags.writeable and got.ctypes.data % 64 == 0


def test_a_file_truncated_after_it_was_opened_is_named_not_mapped(file):
    """A map past the end of a file would kill the process (SIGBUS) when read; the
    check names the file and the tensor instead."""
    path, _ = file
    f = SafetensorsFile(path)
    os.truncate(path, os.path.getsize(path) - 4096)
    with pytest.raises(SafetensorsError, match=r"m\.safetensors.*'big'.*truncated"):
        f.view("big")
    with pytest.raises(SafetensorsError, match=r"m\.safetensors.*'big'.*file ended"):
        f.read("big")


# --- corrupt files: the reference reader as the oracle -----------------------------------

_GOOD = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4).astype(BF16),
         "c": np.arange(3, dtype=np.int64), "empty": np.zeros((0, 4), np.float32)}
_CODES = [*safetensors_io.DTYPES, "F8_E4M3", "F8_E5M2", "U16", "U32", "U64", "C64", "bf16", ""]
_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True),
                               st.sampled_from(_CODES), st.text(max_size=4)),
                     lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner,
                                                                                          max_size=2)), max_leaves=6)
_dims = st.lists(st.integers(-1, 9), max_size=3)


def _layout(order) -> bytes:
    """A valid file of ``_GOOD``'s tensors, their bytes laid out in ``order``."""
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name in order:
        a = _GOOD[name]
        header[name] = {"dtype": safetensors_io.CODES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [len(data), len(data) + a.nbytes]}
        data += a.tobytes()
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@st.composite
def damaged(draw, blob: bytes) -> bytes:
    """``blob`` (a valid file's bytes) with one to three edits: of a header entry's
    fields, of the metadata, of which entries there are, or of the raw bytes."""
    n = struct.unpack("<Q", blob[:8])[0]
    header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
    off = len(data)
    raw_edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "field", "drop_field", "metadata", "drop", "add", "bytes"]))
        names = sorted(n for n in header if n != "__metadata__") or ["a"]
        name = draw(st.sampled_from(names))
        entry = header.setdefault(name, {})
        if kind == "field" and isinstance(entry, dict):
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
            near = {"dtype": st.sampled_from(_CODES), "shape": _dims,
                    "data_offsets": st.lists(st.integers(-2, off + 40), min_size=1, max_size=3),
                    "extra": _json}[field]
            entry[field] = draw(st.one_of(near, _json))
        elif kind == "drop_field" and isinstance(entry, dict) and entry:
            del entry[draw(st.sampled_from(sorted(entry)))]
        elif kind == "metadata":
            header["__metadata__"] = draw(_json)
        elif kind == "drop":
            del header[name]
        elif kind == "add":
            header[draw(st.text(min_size=1, max_size=3))] = draw(st.one_of(_json, st.fixed_dictionaries(
                {"dtype": st.sampled_from(_CODES), "shape": _dims,
                 "data_offsets": st.lists(st.integers(0, off + 8), min_size=2, max_size=2)})))
        else:
            raw_edits.append(draw(st.tuples(st.sampled_from(["truncate", "append", "flip", "length"]),
                                            st.integers(0, 1 << 16), st.binary(min_size=1, max_size=9))))
    text = json.dumps(header).encode()
    blob = struct.pack("<Q", len(text)) + text + data
    for how, at, more in raw_edits:
        at %= len(blob) + 1
        if how == "truncate":
            blob = blob[:at]
        elif how == "append":
            blob += more
        elif how == "flip" and blob:
            at %= len(blob)
            blob = blob[:at] + bytes([blob[at] ^ more[0]]) + blob[at + 1:]
        elif how == "length":
            blob = struct.pack("<Q", at) + blob[8:]
    return blob


def _ours(path):
    f = SafetensorsFile(path)
    try:
        return {n: (safetensors_io.CODES[f.entries[n][0]], list(f.entries[n][1]), f.read(n).tobytes())
                for n in f.keys()}
    finally:
        f.close()


def _reference(blob):
    try:
        return {n: (t["dtype"], list(t["shape"]), bytes(t["data"])) for n, t in safetensors.deserialize(blob)}
    except safetensors.SafetensorError:
        return None


_CAMPAIGN = int(os.environ.get("FUZZ_EXAMPLES", 0))  # as in test_fuzz_cli: fresh random examples


@settings(max_examples=_CAMPAIGN or 400, deadline=None, derandomize=not _CAMPAIGN,
          suppress_health_check=list(HealthCheck))
@given(blob=st.permutations(sorted(_GOOD)).map(_layout).flatmap(damaged))
def test_a_damaged_file_reads_as_the_reference_reader_reads_it_or_is_refused_by_name(tmp_path_factory, blob):
    """Whatever the bytes, ``SafetensorsFile`` gives the tensors the format's reference
    reader gives, or a ``SafetensorsError`` naming the file; it refuses only files
    the reference refuses, and files in dtypes it does not take."""
    path = str(tmp_path_factory.mktemp("damaged") / "x.safetensors")
    with open(path, "wb") as f:
        f.write(blob)
    ref = _reference(blob)
    event(f"the reference {'refuses' if ref is None else 'reads'} it")
    try:
        ours = _ours(path)
    except SafetensorsError as e:
        assert str(e).startswith(path + ": ") and "\n" not in str(e)
        assert ref is None or any(code not in safetensors_io.DTYPES for code, _, _ in ref.values()), (str(e), ref)
        return
    assert ours == ref


def test_atomic_directory_replaces_a_directory_whole_and_keeps_the_old_one_if_the_swap_fails(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with safetensors_io.atomic_directory(str(out), force=True) as tmp:
        (tmp_path / tmp / "new.txt").write_text("new")
        assert os.listdir(out) == ["old.txt"]  # the old one stays until the new one is complete
    assert os.listdir(out) == ["new.txt"] and os.listdir(tmp_path) == ["out"]

    real = os.rename

    def rename(src, dst):  # the old one moved aside, then the new one cannot be moved in
        if str(dst) == str(out) and not str(src).endswith(".old"):
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(safetensors_io.os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        with safetensors_io.atomic_directory(str(out), force=True) as tmp:
            (tmp_path / tmp / "newer.txt").write_text("newer")
    assert os.listdir(out) == ["new.txt"] and os.listdir(tmp_path) == ["out"]
