"""The swap directory's lifecycle: setup checks, file allocation, removal.

[Note: swap faults]
At setup every rank checks that ``nvme_path`` exists, is a directory, accepts a file
(a real probe write: permission bits say nothing for root or read-only mounts) and has
room for every byte this rank will swap; the files are then allocated up front
(``posix_fallocate``), so a disk that fills up later cannot take them away. Each failure
raises ``SwapSetupError`` naming the path and the sizes. Mid-run I/O errors are
swapper.py's ``SwapIOError``; the backend then refuses to step again. The directory
(one per rank and engine) is removed by ``engine.destroy()`` and, failing that, at
interpreter exit or when the backend is garbage collected (``weakref.finalize``).

[Note: stale swap directories]
A process killed with SIGKILL (or by the OOM killer) runs no finalizer: its directory stays
behind, as large as its optimizer state. Every directory records its owner in ``owner.json``
(host name, kernel boot id, pid namespace, pid and the process's start time), and setup
removes (with a warning naming it and its size) every directory named
``hf_zero_swap_rank<r>_<pid>_<id>`` under ``nvme_path`` whose owner certainly no longer
runs: recorded on this host, in this boot and this pid namespace, and its pid either gone
(``os.kill(pid, 0)`` raises ``ProcessLookupError``) or now a different process (another
start time: the pid was reused). It is renamed first, so that two ranks cleaning up at once
do not both remove it, and then deleted. Left alone, whatever their pid says: directories of
other hosts sharing the filesystem, of other containers (another pid namespace), of an
earlier boot of this machine (a host name can repeat across machines, so a different boot
id does not prove the owner dead), and directories without a readable ``owner.json``
(created by an older hf_zero, or being created right now). Those are reported at INFO
level; remove them by hand once no run uses them. Linux only (``/proc``); elsewhere nothing
is removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import uuid
import weakref
from pathlib import Path
from typing import Optional

from hf_zero.config.parse import ConfigError

GIB = 1024 ** 3
OWNER_FILE = "owner.json"
_SWAP_NAME = re.compile(r"hf_zero_swap_rank\d+_(\d+)_[0-9a-f]{8}")
_STALE_PREFIX = ".hf_zero_stale_"   # a stale directory being removed

logger = logging.getLogger(__name__)


class SwapSetupError(RuntimeError):
    """``nvme_path`` cannot hold this rank's swap files."""


def free_bytes(path: Path) -> int:
    """Bytes available to this user under ``path`` (the one free-space query; tests patch it)."""
    return shutil.disk_usage(path).free


def _sizes(needed: int, free: Optional[int] = None) -> str:
    text = f"needs {needed / GIB:.3f} GiB ({needed} bytes)"
    return text if free is None else f"{text}, {free / GIB:.3f} GiB ({free} bytes) free"


def check_swap_dir(nvme_path: Optional[str], needed_bytes: int, key: str) -> Path:
    """Raise one clear error unless ``nvme_path`` can take ``needed_bytes`` of swap files."""
    if not nvme_path:
        raise ConfigError([(f"{key}.nvme_path", "is required when device is 'nvme'")])
    path = Path(nvme_path)
    if not path.exists():
        raise SwapSetupError(f"hf_zero: {key}.nvme_path {path} does not exist (swap {_sizes(needed_bytes)})")
    if not path.is_dir():
        raise SwapSetupError(f"hf_zero: {key}.nvme_path {path} is not a directory")
    probe = path / f".hf_zero_probe_{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0")
    except OSError as err:
        raise SwapSetupError(f"hf_zero: {key}.nvme_path {path} is not writable ({err.strerror}); "
                             f"swap {_sizes(needed_bytes)}") from err
    probe.unlink()
    remove_stale_swap_dirs(path)   # before the space check: their bytes count as free
    free = free_bytes(path)
    if free < needed_bytes:
        raise SwapSetupError(f"hf_zero: {key}.nvme_path {path} has too little space: this rank's swap "
                             f"{_sizes(needed_bytes, free)}")
    return path


def _remove(directory: str, owner_pid: int) -> None:
    # A forked child (a DataLoader worker) inherits the finalizer; only the owner may remove.
    if os.getpid() == owner_pid:
        shutil.rmtree(directory, ignore_errors=True)


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _start_time(pid: int) -> Optional[int]:
    """When ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22)."""
    stat = _read_text(f"/proc/{pid}/stat")
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19]) if stat else None


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def owner_record(pid: int) -> dict:
    """What identifies process ``pid`` of this host, written to each swap directory."""
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": _pid_namespace(), "pid": pid, "start_time": _start_time(pid)}


def _owner_is_gone(owner: dict, pid: int) -> bool:
    """True only when the recorded owner certainly runs no more ([Note: stale swap directories])."""
    here = owner_record(os.getpid())
    if owner.get("pid") != pid or any(here[k] is None or owner.get(k) != here[k]
                                      for k in ("host", "boot_id", "pid_namespace")):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass   # alive, another user's
    started = _start_time(pid)
    return started is not None and owner.get("start_time") is not None and started != owner["start_time"]


def _disk_bytes(directory: Path) -> int:
    total = 0
    for parent, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_blocks * 512
            except OSError:
                pass
    return total


def remove_stale_swap_dirs(root: Path) -> list[Path]:
    """Remove the swap directories under ``root`` left by processes of this host that are gone
    ([Note: stale swap directories]); returns their paths."""
    removed = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(_STALE_PREFIX):   # an earlier removal that was interrupted
            shutil.rmtree(entry, ignore_errors=True)
            continue
        match = _SWAP_NAME.fullmatch(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        try:
            owner = json.loads((entry / OWNER_FILE).read_text())
        except (OSError, ValueError):
            owner = None
        if not isinstance(owner, dict):   # an older hf_zero's, or one being created right now
            logger.info("hf_zero: left swap directory %s alone: no readable %s", entry, OWNER_FILE)
            continue
        if not _owner_is_gone(owner, int(match.group(1))):
            if owner.get("host") != socket.gethostname():
                logger.info("hf_zero: left swap directory %s alone: owned by host %s", entry, owner.get("host"))
            continue
        doomed = root / f"{_STALE_PREFIX}{uuid.uuid4().hex[:8]}"
        try:
            entry.rename(doomed)
        except OSError:
            continue   # another rank is removing it
        size = _disk_bytes(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        logger.warning("hf_zero: removed stale swap directory %s (%.3f GiB, %d bytes): its owner, pid %d "
                       "on this host, no longer runs", entry, size / GIB, size, owner["pid"])
        removed.append(entry)
    return removed


class SwapDir:
    """A private directory under ``nvme_path`` holding one rank's swap files, and ``owner.json``."""

    def __init__(self, root: Path, rank: int):
        self.path = root / f"hf_zero_swap_rank{rank}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        self._finalizer = weakref.finalize(self, _remove, str(self.path), os.getpid())
        # Without it the directory is never taken for stale (the window between mkdir and here).
        (self.path / OWNER_FILE).write_text(json.dumps(owner_record(os.getpid())))

    def allocate(self, name: str, nbytes: int) -> Path:
        """Create ``name`` with ``nbytes`` reserved (reads as zeros)."""
        file = self.path / name
        fd = os.open(file, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as err:
                if err.errno not in (95, 22):   # EOPNOTSUPP / EINVAL: no fallocate here, size it sparse
                    raise SwapSetupError(f"hf_zero: cannot allocate {nbytes} bytes for {file}: {err}") from err
                os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        return file

    def remove(self) -> None:
        self._finalizer()
