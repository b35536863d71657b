"""Streaming safetensors I/O without extra copies or memory maps.

``safetensors.torch.save_file`` first copies every tensor into a Python ``bytes`` object and
``safe_open`` memory-maps the file (its touched pages count as resident memory), which
doubles peak memory when consolidating a large model. The format is simple (8-byte little
endian header length, a JSON header of dtype/shape/byte offsets, then raw little-endian
data), so hf_zero writes tensors straight from their storage, hashing as it goes, and reads
any element range straight into a destination tensor. Files stay standard safetensors.
A ``Streamed`` entry is written part by part, so a tensor that is not in memory (NVMe
offloaded optimizer state) never needs to be materialised whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Optional, Union, cast

import torch

if TYPE_CHECKING:
    from typing_extensions import Buffer

_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
          torch.uint8: "U8", torch.bool: "BOOL"}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU uint8 tensor, shared (an ndarray has the buffer protocol;
    numpy's stubs do not declare it)."""
    return memoryview(cast("Buffer", tensor.numpy()))


def _raw(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return _bytes_of(flat.view(torch.uint8)) if flat.numel() else memoryview(b"")


@dataclass(frozen=True)
class Streamed:
    """A 1D tensor of ``numel`` elements of ``dtype`` whose data ``parts()`` yields as consecutive
    1D tensors; each part is written before the next is requested."""
    dtype: torch.dtype
    numel: int
    parts: Callable[[], Iterable[torch.Tensor]]


def _write_parts(f, digest, name: str, entry: Union[torch.Tensor, Streamed]) -> None:
    parts: Iterable[torch.Tensor]
    if isinstance(entry, Streamed):
        parts, numel = entry.parts(), entry.numel
    else:
        parts, numel = (entry,), entry.numel()
    written = 0
    for part in parts:
        if part.dtype != entry.dtype:
            raise TypeError(f"'{name}': a part of dtype {part.dtype}, the header says {entry.dtype}")
        raw = _raw(part)
        f.write(raw)
        digest.update(raw)
        written += part.numel()
    if written != numel:
        raise RuntimeError(f"'{name}': {written} elements written, the header says {numel}")


def write_safetensors(path: Path, tensors: Mapping[str, Union[torch.Tensor, Streamed]],
                      metadata: Optional[dict] = None) -> dict:
    """Write ``tensors`` to ``path`` (fsync'ed); returns {"bytes", "sha256"} of the file."""
    header: dict = {}
    offset = 0
    for name, t in tensors.items():
        shape = [t.numel] if isinstance(t, Streamed) else list(t.shape)
        nbytes = math.prod(shape) * t.dtype.itemsize
        header[name] = {"dtype": _CODES[t.dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)   # the data section starts 8-byte aligned
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for part in (struct.pack("<Q", len(encoded)), encoded):
            f.write(part)
            digest.update(part)
        for name, t in tensors.items():
            _write_parts(f, digest, name, t)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": 8 + len(encoded) + offset, "sha256": digest.hexdigest()}


class SafetensorsFile:
    """Random access to the tensors of one file by element range."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        try:
            (length,) = struct.unpack("<Q", self._file.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            self.header = json.loads(self._file.read(length))
        except (struct.error, ValueError, UnicodeDecodeError) as err:
            self._file.close()
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
        self._data_start = 8 + length
        self.header.pop("__metadata__", None)
        end = max((e["data_offsets"][1] for e in self.header.values()), default=0)
        if self._data_start + end > size:
            self._file.close()
            raise ValueError(f"{path} is truncated: data ends at byte {size}, header needs {self._data_start + end}")

    def keys(self) -> list[str]:
        return list(self.header)

    def read_into(self, key: str, start: int, out: torch.Tensor) -> None:
        """Elements [start, start + out.numel()) of the flattened tensor ``key`` into ``out``
        (1D, any float dtype: cast when it differs from the stored dtype)."""
        entry = self.header[key]
        dtype = _DTYPES[entry["dtype"]]
        itemsize = torch.empty((), dtype=dtype).element_size()
        first, last = entry["data_offsets"]
        count = out.numel()
        if start < 0 or (start + count) * itemsize > last - first:
            raise ValueError(f"{self.path}: range [{start}, {start + count}) outside '{key}'")
        direct = out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"
        buffer = out if direct else torch.empty(count, dtype=dtype)
        view = _bytes_of(buffer.view(-1).view(torch.uint8)) if count else memoryview(bytearray())
        got = os.preadv(self._file.fileno(), [view], self._data_start + first + start * itemsize)
        if got != len(view):
            raise ValueError(f"{self.path}: short read of '{key}' ({got} of {len(view)} bytes)")
        if not direct:
            out.copy_(buffer)

    def close(self) -> None:
        self._file.close()
