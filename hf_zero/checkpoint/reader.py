"""Read a checkpoint's manifest and any slice of any stored tensor, validating as it goes."""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Optional

import torch
from hf_zero.checkpoint.files import CheckpointError, read_json, sha256_file, validate_tag
from hf_zero.checkpoint.safetensors_io import SafetensorsFile

FORMAT = "hf_zero-checkpoint/1"


def resolve_tag(load_dir: Path, tag: Optional[str]) -> str:
    if tag is None:
        latest = load_dir / "latest"
        if not latest.is_file():
            raise CheckpointError(f"no 'latest' file in {load_dir}: pass tag= or save a checkpoint first")
        tag = latest.read_text().strip()
    return validate_tag(tag)


class CheckpointReader:
    """One checkpoint directory: its manifest, and tensors read slice by slice.

    Every file's size is checked on open; a file's sha256 is checked the first time this
    process reads from it (``verify=True``), so corruption is an error naming the file.
    """

    def __init__(self, path: Path, verify: bool = True):
        self.path = path
        self.manifest = read_json(path / "manifest.json")
        if self.manifest.get("format") != FORMAT:
            raise CheckpointError(f"{path / 'manifest.json'}: not an hf_zero checkpoint "
                                  f"(format {self.manifest.get('format')!r}, expected {FORMAT!r})")
        self.verify = verify
        self._handles: dict[str, SafetensorsFile] = {}
        for name, entry in self.manifest["files"].items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"missing checkpoint file: {file}")
            if file.stat().st_size != entry["bytes"]:
                raise CheckpointError(f"truncated or altered checkpoint file {file}: "
                                      f"{file.stat().st_size} bytes, manifest says {entry['bytes']}")
        # (kind, name) -> sorted [(start, length, file, key)]
        self._pieces: dict[tuple[str, str], list[tuple[int, int, str, str]]] = {}
        for key, p in self.manifest["pieces"].items():
            self._pieces.setdefault((p["kind"], p["name"]), []).append((p["start"], p["length"], p["file"], key))
        for entries in self._pieces.values():
            entries.sort()

    def has(self, kind: str, name: str) -> bool:
        return (kind, name) in self._pieces

    def _handle(self, file: str) -> SafetensorsFile:
        if file not in self._handles:
            path = self.path / file
            if self.verify and sha256_file(path) != self.manifest["files"][file]["sha256"]:
                raise CheckpointError(f"corrupted checkpoint file {path}: checksum does not match the manifest")
            try:
                self._handles[file] = SafetensorsFile(path)
            except ValueError as err:
                raise CheckpointError(f"unreadable checkpoint file: {err}") from None
        return self._handles[file]

    def _segments(self, kind: str, name: str, start: int, end: int) -> list[tuple[int, int, int, str, str]]:
        """[(lo, hi, piece_start, file, key)] covering elements [start, end) of ``kind`` of ``name``."""
        entries = self._pieces.get((kind, name))
        if not entries:
            raise CheckpointError(f"{self.path}: no '{kind}' data for parameter '{name}'")
        segments = []
        first = max(0, bisect.bisect_right(entries, (start, float("inf"))) - 1)
        for piece_start, length, file, key in entries[first:]:
            if piece_start >= end:
                break
            lo, hi = max(start, piece_start), min(end, piece_start + length)
            if hi > lo:
                segments.append((lo, hi, piece_start, file, key))
        covered = sum(hi - lo for lo, hi, *_ in segments)
        if covered != end - start:
            raise CheckpointError(f"{self.path}: '{kind}' of '{name}' covers {covered} of elements "
                                  f"[{start}, {end}); the checkpoint is incomplete")
        return segments

    def check(self, kind: str, name: str, start: int, length: int) -> None:
        """Raise now what ``fill`` of that range would raise for a missing, incomplete or
        corrupted checkpoint (every file involved is opened and checksummed); reads no data."""
        for *_, file, key in self._segments(kind, name, start, start + length):
            if key not in self._handle(file).header:
                raise CheckpointError(f"{self.path / file}: cannot read '{key}': not in the file")

    def fill(self, target: torch.Tensor, kind: str, name: str, start: int) -> None:
        """Copy elements [start, start + target.numel()) of the flattened ``kind`` tensor of
        parameter ``name`` into the 1D ``target`` (casting), from whichever pieces hold them."""
        for lo, hi, piece_start, file, key in self._segments(kind, name, start, start + target.numel()):
            try:
                self._handle(file).read_into(key, lo - piece_start, target[lo - start:hi - start])
            except (KeyError, ValueError) as err:
                raise CheckpointError(f"{self.path / file}: cannot read '{key}': {err}") from None

    def full(self, kind: str, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The whole tensor, shaped like the parameter/buffer it belongs to."""
        info = self.manifest["params"].get(name) or self.manifest["buffers"][name]
        numel = 1
        for d in info["shape"]:
            numel *= d
        stored = dtype or getattr(torch, info["dtype"].removeprefix("torch."))
        out = torch.empty(numel, dtype=stored if kind != "master" else torch.float32)
        self.fill(out, kind, name, 0)
        return out.view(info["shape"]).to(dtype) if dtype else out.view(info["shape"])

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
