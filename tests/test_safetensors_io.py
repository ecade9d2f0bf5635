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
