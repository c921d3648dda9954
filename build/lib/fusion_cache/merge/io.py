"""Tensor-at-a-time safetensors I/O: a reader for single-file and sharded models, and a streaming sharded writer.

Never a whole state dict: a merge holds only the tensors it is working on. Reads are either ``pread`` into a buffer
(`SafetensorsModel.tensor`) or a zero-copy view of the file's memory map (`SafetensorsModel.view`), which the merge
converts straight into its fp32 rows and then releases (`SafetensorsModel.release`: the mapped pages would otherwise
count towards the process's resident memory until the end). Writes are plain ``write`` calls.

    model = SafetensorsModel("runs/kd/model")     # model.safetensors or model.safetensors.index.json
    t = model.tensor("model.embed_tokens.weight") # a torch tensor, read from disk now
    v = model.view("model.embed_tokens.weight")   # the same values, mapped (no copy); read it, then:
    model.release("model.embed_tokens.weight")
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from fusion_cache.errors import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype codes <-> torch dtypes (the ones a model checkpoint may hold).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype code, shape and absolute byte range in that file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header (no tensor data is read).

    Raises:
        ConfigError: the file is not a valid safetensors file (the message names it).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ConfigError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8:
                raise ConfigError(f"{path}: not a safetensors file (header length {n} > file size {size})")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the safetensors header ({e})") from None
    out = {}
    data_start = 8 + n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") not in DTYPES:
            raise ConfigError(f"{path}: tensor {name!r} has unsupported dtype {meta.get('dtype')!r}")
        begin, end = meta["data_offsets"]
        out[name] = TensorInfo(path, meta["dtype"], tuple(meta["shape"]), data_start + begin, data_start + end)
    return out


def find_model_dir(path: str | os.PathLike[str]) -> Path:
    """The directory holding the weights: ``path`` itself, or ``path/model`` for a `fusion-cache train` run dir.

    Raises:
        ConfigError: neither holds model.safetensors or model.safetensors.index.json.
    """
    p = Path(path)
    for candidate in (p, p / "model"):
        if (candidate / INDEX_FILE).is_file() or (candidate / SINGLE_FILE).is_file():
            return candidate
    if not p.exists():
        raise ConfigError(f"model {str(p)!r} does not exist")
    raise ConfigError(f"{p}: no {SINGLE_FILE} or {INDEX_FILE} (nor in {p / 'model'}); only safetensors models merge")


class SafetensorsModel:
    """A model directory's tensors by name, read one at a time. Single-file or sharded (index json)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.dir = find_model_dir(path)
        self.infos: dict[str, TensorInfo] = {}
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ConfigError(f"{index}: not a safetensors index ({e!r})") from None
            for file in sorted(set(weight_map.values())):
                headers = read_header(self.dir / file)
                for name, info in headers.items():
                    if weight_map.get(name) == file:
                        self.infos[name] = info
            missing = sorted(set(weight_map) - set(self.infos))
            if missing:
                raise ConfigError(f"{index}: tensor {missing[0]!r} is in the index but not in {weight_map[missing[0]]}")
        else:
            self.infos = read_header(self.dir / SINGLE_FILE)
        self._handles: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}

    @property
    def config(self) -> dict:
        """config.json as a dict ({} if absent)."""
        cfg = self.dir / "config.json"
        return json.loads(cfg.read_text()) if cfg.is_file() else {}

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def tensor(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read tensor ``name`` from disk into a tensor of its stored dtype and shape.

        Args:
            out: a contiguous buffer of any dtype with at least the tensor's byte size; the tensor is read into its
                first bytes and returned as a view of them (reusing one buffer avoids a fresh allocation, and its
                page faults, per tensor). None: a fresh tensor.
        """
        info = self.infos[name]
        fd = self._fd(info.file)
        dtype = DTYPES[info.dtype]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        if out is None:
            buf = torch.empty(info.nbytes, dtype=torch.uint8)  # uninitialized: no zero-fill pass before the read
        else:
            if not out.is_contiguous() or out.numel() * out.element_size() < info.nbytes:
                raise ValueError(f"out: need a contiguous buffer of >= {info.nbytes} bytes for {name!r}")
            buf = out.reshape(-1).view(torch.uint8)[: info.nbytes]
        view = memoryview(buf.numpy())
        done = 0
        while done < info.nbytes:  # pread may return short counts on large reads
            n = os.preadv(fd, [view[done:]], info.start + done)
            if n == 0:
                raise ConfigError(f"{info.file}: truncated while reading tensor {name!r}")
            done += n
        return buf.view(dtype).reshape(info.shape)

    def _fd(self, file: Path) -> int:
        fd = self._handles.get(file)
        if fd is None:
            fd = self._handles[file] = os.open(file, os.O_RDONLY)
        return fd

    def view(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a view of its file's memory map: no read into a buffer, no copy.

        The map is private (copy-on-write), so writing to the view never reaches the file; the merge only reads it.
        Its pages count towards resident memory once touched: call `release` when done. Falls back to `tensor` (a
        fresh read) for an empty tensor or an offset that is not a multiple of the element size.
        """
        info = self.infos[name]
        dtype = DTYPES[info.dtype]
        size = torch.empty((), dtype=dtype).element_size()
        if info.nbytes == 0 or info.start % size:
            return self.tensor(name)
        mm = self._maps.get(info.file)
        if mm is None:
            mm = self._maps[info.file] = mmap.mmap(self._fd(info.file), 0, access=mmap.ACCESS_COPY)
        if info.end > len(mm):
            raise ConfigError(f"{info.file}: truncated while reading tensor {name!r}")
        flat = torch.frombuffer(mm, dtype=dtype, count=info.nbytes // size, offset=info.start)
        return flat.view(info.shape)

    def release(self, name: str) -> None:
        """Drop the mapped pages of tensor ``name`` from this process (the page cache keeps them); a no-op if its
        file is not mapped. A view of it stays valid: reading it again maps the pages again."""
        info = self.infos[name]
        mm = self._maps.get(info.file)
        if mm is None or info.nbytes == 0:
            return
        start = info.start - info.start % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, start, info.end - start)

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a view is still alive; the map closes when it goes
                pass
        self._maps.clear()
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()

    def __enter__(self) -> SafetensorsModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- writing
@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class ShardedWriter:
    """Writes tensors, one at a time and in a fixed planned order, into ``model-0000i-of-0000N.safetensors`` files
    plus ``model.safetensors.index.json``. The layout (and so every header) is known up front from names, dtypes
    and shapes, so no shard is ever held in memory.

    Usage:
        with ShardedWriter(out_dir, plan, max_shard_bytes) as w:
            for p in w.plan: w.write(p.name, tensor)
    """

    def __init__(self, out_dir: Path, plan: list[PlannedTensor], max_shard_bytes: int, metadata: dict | None = None):
        self.out_dir = Path(out_dir)
        self.plan = plan
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for p in plan:
            if shards[-1] and size + p.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(p)
            size += p.nbytes
        n = len(shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shard_of = {p.name: i for i, shard in enumerate(shards) for p in shard}
        self._shards = shards
        self._pos = 0
        self._fh = None
        self._current = -1

    def _header(self, shard: list[PlannedTensor]) -> bytes:
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for p in shard:
            header[p.name] = {
                "dtype": CODES[p.dtype],
                "shape": list(p.shape),
                "data_offsets": [offset, offset + p.nbytes],
            }
            offset += p.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the safetensors writer does
        return struct.pack("<Q", len(raw)) + raw

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor; ``name``, dtype and shape must match the plan."""
        expected = self.plan[self._pos]
        assert name == expected.name, f"write order: expected {expected.name!r}, got {name!r}"
        assert tensor.dtype == expected.dtype and tuple(tensor.shape) == expected.shape, (
            f"{name}: planned {expected.dtype}{list(expected.shape)}, got {tensor.dtype}{list(tensor.shape)}"
        )
        shard = self.shard_of[name]
        if shard != self._current:
            if self._fh is not None:
                self._fh.close()
            self._fh = open(self.out_dir / self.files[shard], "wb")
            self._fh.write(self._header(self._shards[shard]))
            self._current = shard
        data = tensor.contiguous().reshape(-1)
        if data.numel():
            self._fh.write(memoryview(data.view(torch.uint8).numpy()))
        self._pos += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._pos != len(self.plan):
            return  # an error interrupted the merge; the caller discards the directory
        index = {
            "metadata": {"total_size": sum(p.nbytes for p in self.plan)},
            "weight_map": {p.name: self.files[self.shard_of[p.name]] for p in self.plan},
        }
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
