"""The safetensors format, read and written without holding whole files.

A safetensors file is an 8-byte little-endian header length ``H``, a JSON
header of ``H`` bytes (``{name: {"dtype", "shape", "data_offsets": [begin,
end]}, "__metadata__": {...}}``, offsets relative to the end of the header),
then the tensor bytes back to back.

``SafetensorsFile`` gives one tensor (or a block of its rows) at a time:
``read`` ``pread``s it into a fresh array, ``view`` maps its pages in the
page cache without copying them.  Either way only the tensors in use count
towards the process's resident memory (a merge of four 1 GB models over
whole-file memory maps shows ~4 GB RSS).  ``ShardWriter`` streams tensors
straight to their final place in shards laid out up front, so no shard is
ever held in memory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
import shutil
import struct
import sys
import tempfile

import ml_dtypes
import numpy as np

DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
          "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
          "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}
CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20
MAP_MIN = 1 << 20  # bytes below which ``view`` reads: a map costs more than the copy
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)  # Linux >= 5.14


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names file and tensor."""


class SafetensorsError(ValueError):
    """A corrupt, truncated or unsupported safetensors file (the message names it)."""


class SafetensorsFile:
    """Headers parsed on open; ``read(name)`` costs one ``pread`` of that tensor,
    ``view(name)`` one memory map of it."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self._parse()
        except BaseException:
            os.close(self._fd)
            raise

    def _bad(self, why: str):
        return SafetensorsError(f"{self.path}: corrupt or truncated safetensors file ({why})")

    def _parse(self):
        """The header, validated as the format's reference reader validates it: every
        tensor's bytes lie back to back from the start of the data, in some order,
        without gaps or overlaps, and cover the rest of the file exactly."""
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise self._bad(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise self._bad(f"header length {n} does not fit in {size} bytes")
        try:
            header = json.loads(os.pread(self._fd, n, 8), parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise self._bad(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            raise self._bad(f"__metadata__ is not a map of strings to strings: {meta!r:.80}")
        self.metadata = meta or {}
        self._start = 8 + n
        self.entries = {}
        for name, e in header.items():
            self.entries[name] = self._entry(name, e)
        covered = 0  # bytes of data accounted for, tensors taken in the order of their offsets
        for begin, end, name in sorted((b, b + _nbytes(d, s), k) for k, (d, s, b) in self.entries.items()):
            if begin != covered:
                how = ("overlap the previous tensor's" if begin < covered
                       else f"leave {begin - covered} bytes unused before them")
                raise self._bad(f"tensor {name!r}: its bytes {begin}..{end} {how}")
            covered = end
        if self._start + covered > size:
            raise self._bad(f"the tensors end at byte {self._start + covered}, past the end of the file ({size})")
        if self._start + covered < size:
            raise self._bad(f"{size - self._start - covered} bytes after the last tensor belong to none")

    def _entry(self, name: str, e):
        """``(dtype, shape, begin)`` of one header entry."""
        if not (isinstance(e, dict) and _naturals(e.get("shape")) and _naturals(e.get("data_offsets"))
                and len(e["data_offsets"]) == 2 and "dtype" in e):
            raise self._bad(f"bad entry for tensor {name!r}: {e!r:.200}")
        code, shape, (begin, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
        if not isinstance(code, str) or code not in DTYPES:
            raise self._bad(f"tensor {name!r}: dtype {code!r} is not one this reader takes ({', '.join(DTYPES)})")
        if end - begin != _nbytes(DTYPES[code], shape):
            raise self._bad(f"tensor {name!r}: offsets {begin}..{end} do not match shape {shape} {code}")
        return DTYPES[code], shape, begin

    def keys(self):
        return list(self.entries)

    def _locate(self, name: str, rows, flat: bool = False):
        dtype, shape, begin = self.entries[name]
        if rows is not None:
            start, stop = rows
            row = (shape[-1],) if flat else shape[1:]
            begin += start * math.prod(row) * dtype.itemsize
            shape = (stop - start, *row)
        return dtype, shape, self._start + begin

    def read(self, name: str, rows: tuple[int, int] | None = None, *, flat: bool = False) -> np.ndarray:
        """The tensor, or its leading-axis slice ``rows = (start, stop)`` (with ``flat``,
        rows of its ``[-1, shape[-1]]`` view), in a fresh 64-byte-aligned array."""
        dtype, shape, offset = self._locate(name, rows, flat)
        out = aligned_empty(shape, dtype)
        self._pread_into(out.reshape(-1), offset, name)
        return out

    def columns(self, name: str, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        """Columns ``cols = (start, stop)`` of rows ``rows`` of the tensor's ``[-1,
        shape[-1]]`` view, in a fresh 64-byte-aligned array: one ``pread`` a row, so
        that only those bytes are read (a map of the rows would bring all their pages
        in)."""
        dtype, shape, offset = self._locate(name, rows, flat=True)
        (c0, c1), width = cols, shape[1] if len(shape) > 1 else 1
        if not 0 <= c0 <= c1 <= width:
            raise ValueError(f"tensor {name!r}: columns {c0}:{c1} of rows {width} long")
        out = aligned_empty((shape[0], c1 - c0), dtype)
        buf, size = memoryview(out.reshape(-1).view(np.uint8)), (c1 - c0) * dtype.itemsize
        at, step = offset + c0 * dtype.itemsize, width * dtype.itemsize
        for r in range(shape[0]):  # one pread a row; a short one (rare) is finished by _pread_into
            if os.preadv(self._fd, [buf[r * size:(r + 1) * size]], at + r * step) != size:
                self._pread_into(out[r], at + r * step, name)
        return out

    def _pread_into(self, out: np.ndarray, offset: int, name: str) -> None:
        """Fill ``out`` (1-D, contiguous) from the file's bytes at ``offset``."""
        buf = memoryview(out.view(np.uint8))
        done, total = 0, out.nbytes
        while done < total:
            got = os.preadv(self._fd, [buf[done:]], offset + done)
            if got <= 0:
                raise self._bad(f"tensor {name!r}: file ended while reading")
            done += got

    def view(self, name: str, rows: tuple[int, int] | None = None, *, flat: bool = False) -> np.ndarray:
        """What ``read`` returns, as an array over the file's pages in the page cache
        instead of a copy: a private copy-on-write map (writing to the array never
        changes the file), its page table filled up front.  Its pages count towards
        resident memory while the array lives.  Ranges under 1 MB, at offsets not
        aligned to the dtype, or in files that cannot be mapped, are ``read``.  The
        array is aligned to its dtype, not necessarily to the 64 bytes that
        ``jax.device_put`` needs to alias rather than copy it.  As with any memory
        map, truncating the file while the array lives kills the process (SIGBUS)
        when it touches lost pages."""
        dtype, shape, offset = self._locate(name, rows, flat)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MAP_MIN or offset % dtype.itemsize:
            return self.read(name, rows, flat=flat)
        if os.fstat(self._fd).st_size < offset + nbytes:
            raise self._bad(f"tensor {name!r}: the file is shorter than its header says (truncated since opened)")
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            pages = mmap.mmap(self._fd, offset + nbytes - start, access=mmap.ACCESS_COPY, offset=start)
        except OSError:  # a file system that cannot map files (ENODEV), or no address space left
            return self.read(name, rows, flat=flat)
        try:
            if _MADV_POPULATE_READ is not None:
                pages.madvise(_MADV_POPULATE_READ)
        except OSError as e:  # EINVAL: a kernel without it, the pages fault in as they are read
            if e.errno == errno.EFAULT:
                pages.close()
                raise self._bad(f"tensor {name!r}: the file ended while mapping it (truncated since opened)") from None
        return np.frombuffer(pages, dtype, math.prod(shape), offset - start).reshape(shape)

    def close(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _naturals(x) -> bool:
    """Whether ``x`` is a JSON list of non-negative integers (as a shape or offsets are)."""
    return isinstance(x, list) and all(type(d) is int and d >= 0 for d in x)


def _nbytes(dtype, shape) -> int:
    return math.prod(shape) * dtype.itemsize


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def aligned_empty(shape, dtype, alignment: int = 64) -> np.ndarray:
    """``np.empty`` on a 64-byte boundary: ``jax.device_put`` to the CPU then
    aliases the buffer instead of copying it."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    off = (-raw.ctypes.data) % alignment
    return raw[off:off + nbytes].view(dtype).reshape(shape)


def _header(entries, metadata) -> bytes:
    """The length-prefixed JSON header, padded with spaces to 8-byte alignment."""
    header = {"__metadata__": metadata} if metadata else {}
    header.update(entries)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes tensors into shards of at most ``shard_size`` bytes, in the order given.

    ``layout`` (``[(name, shape, dtype), ...]``, the order ``add`` will be
    called in) lays the shards out up front, so each tensor is written
    straight to its final place and memory holds one tensor at a time.
    ``finish()`` names the shards ``model-0000i-of-0000N.safetensors`` with a
    ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``),
    or ``model.safetensors`` when one shard suffices.
    """

    def __init__(self, directory: str, shard_size: int, layout, metadata=None):
        self.dir = directory
        self.metadata = metadata or {"format": "pt"}
        self.total = 0
        self._plan = [(n, tuple(s), np.dtype(d)) for n, s, d in layout]
        self._next = 0  # index into the planned order
        self._file = None
        self.shards = []  # [[(name, shape, dtype), ...], ...]
        cur, cur_bytes = [], 0
        for n, s, d in self._plan:
            nbytes = math.prod(s) * d.itemsize
            if cur and cur_bytes + nbytes > shard_size:
                self.shards.append(cur)
                cur, cur_bytes = [], 0
            cur.append((n, s, d))
            cur_bytes += nbytes
        if cur:
            self.shards.append(cur)
        self._shard_of = {n: i for i, sh in enumerate(self.shards) for n, _, _ in sh}

    def _part(self, i: int) -> str:
        return os.path.join(self.dir, f"part-{i:05d}.safetensors")

    def _open_shard(self, i: int) -> None:
        self._close_file()
        self._file, self._file_index = open(self._part(i), "wb"), i
        entries, off = {}, 0
        for n, s, d in self.shards[i]:
            nbytes = math.prod(s) * d.itemsize
            entries[n] = {"dtype": CODES[d], "shape": list(s), "data_offsets": [off, off + nbytes]}
            off += nbytes
        self._file.write(_header(entries, self.metadata))

    def add(self, name: str, arr: np.ndarray) -> None:
        self.add_rows(name, arr, whole=True)

    def add_rows(self, name: str, arr: np.ndarray, whole: bool = False) -> None:
        """The next rows of tensor ``name``: of its leading axis, or of its ``[-1,
        shape[-1]]`` view (``add`` them in order, all of them)."""
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in CODES:
            raise SafetensorsError(f"tensor {name!r}: dtype {arr.dtype} has no safetensors code")
        want = self._plan[self._next] if self._next < len(self._plan) else None
        done = getattr(self, "_entries_done", 0)
        fits = want is not None and want[0] == name and want[2] == arr.dtype and (
            arr.shape == want[1] if whole else (arr.shape[1:] in (want[1][1:], want[1][-1:])
                                                and done + arr.size <= math.prod(want[1])))
        if not fits:
            raise SafetensorsError(f"tensor {name!r} {arr.shape} {arr.dtype} arrived where the layout expects {want}")
        i = self._shard_of[name]
        if self._file is None or self._file_index != i:
            self._open_shard(i)
        self._file.write(memoryview(arr.reshape(-1).view(np.uint8)))
        self.total += arr.nbytes
        self._entries_done = 0 if whole else done + arr.size
        if whole or self._entries_done == math.prod(want[1]):
            self._entries_done = 0
            self._next += 1

    def _close_file(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        self._close_file()
        if self._next != len(self._plan):
            missing = [n for n, _, _ in self._plan[self._next:]][:3]
            raise SafetensorsError(f"{len(self._plan) - self._next} planned tensors were never written: {missing}")
        n = len(self.shards)
        if n == 1:
            os.rename(self._part(0), os.path.join(self.dir, "model.safetensors"))
            return
        weight_map = {}
        for i, tensors in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(self._part(i), os.path.join(self.dir, fname))
            weight_map.update({nm: fname for nm, _, _ in tensors})
        with open(os.path.join(self.dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)


ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # a peft adapter directory


def is_adapter_dir(path: str) -> bool:
    """Whether ``path`` is a peft adapter directory (it holds ``adapter_config.json``)."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def checkpoint_files(path: str) -> dict:
    """HF tensor name -> safetensors file, for a directory (single or sharded) or one file."""
    if os.path.isfile(path) and path.endswith(".safetensors"):
        files = [path]
    elif os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            wm = json_object(index).get("weight_map")
            if not (isinstance(wm, dict) and wm and all(isinstance(v, str) and v for v in wm.values())):
                raise CheckpointError(f"{index}: no weight_map of tensor names to shard file names ({wm!r:.80})")
            out = {}
            for name, fname in wm.items():
                fp = os.path.join(path, fname)
                if not os.path.isfile(fp):
                    raise CheckpointError(f"{index}: shard {fname} (holding {name}) is missing")
                out[name] = fp
            return out
        if os.path.isfile(single):
            files = [single]
        elif any(f.endswith(".bin") for f in os.listdir(path)):
            raise CheckpointError(
                f"{path} holds pickled PyTorch .bin weights; we do not unpickle (it runs arbitrary code). "
                "Convert them to safetensors first."
            )
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    else:
        raise CheckpointError(f"{path}: no such checkpoint")
    out = {}
    for fp in files:
        f = open_checked(fp)
        out.update({name: fp for name in f.keys()})
        f.close()
    return out


def json_object(path: str) -> dict:
    """The JSON object that file ``path`` holds (a checkpoint's index or config); a
    file that cannot be read, or holds anything else, is a ``CheckpointError``
    naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f, parse_constant=_no_constant)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(doc), "a number")
        raise CheckpointError(f"{path}: not a JSON object ({kind})")
    return doc


def open_checked(fp: str) -> SafetensorsFile:
    """``SafetensorsFile(fp)``, its errors as ``CheckpointError``."""
    try:
        return SafetensorsFile(fp)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"{fp}: cannot open ({e.strerror})") from None


def no_room(path: str, need: int, reclaimable: int = 0) -> str | None:
    """Why ``need`` bytes cannot be written to ``path`` (which need not exist yet): its
    file system, that of its nearest existing ancestor, has less free, counting
    ``reclaimable`` bytes that will be deleted first as free; else None."""
    there = os.path.abspath(path)
    while not os.path.exists(there):
        there = os.path.dirname(there)
    free = shutil.disk_usage(there).free
    if need <= free + reclaimable:
        return None
    also = f" and {reclaimable / 2**30:.2f} GiB of leftovers to remove" if reclaimable else ""
    return f"{path}: needs {need / 2**30:.2f} GiB, but {there} has {free / 2**30:.2f} GiB free{also}"


@contextlib.contextmanager
def atomic_directory(path: str, *, force: bool = False):
    """A temporary directory beside ``path``, renamed to ``path`` when the block
    completes and removed if it fails (or is interrupted).  An existing ``path``
    is a ``FileExistsError`` unless ``force``, and is replaced only at the end:
    renamed aside, the new one renamed into place, then the old one removed: a
    process killed meanwhile leaves the old or the new one whole."""
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} exists; pass force=True to overwrite")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    aside = None
    try:
        yield tmp
        if os.path.exists(path):
            aside = f"{tmp}.old"
            os.rename(path, aside)
        os.rename(tmp, path)
    except BaseException:
        if aside is not None and not os.path.exists(path):
            os.rename(aside, path)  # the old one back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
