"""``hf-zero env``: versions, distributed backends, and which accelerated paths work here."""

from __future__ import annotations

import importlib
import os
import platform
import tempfile


def _version(name: str) -> str:
    try:
        return importlib.import_module(name).__version__
    except Exception as err:   # missing or broken installs are reported, not raised
        return f"not usable ({type(err).__name__})"


def o_direct_usable(directory: str) -> bool:
    """Can this filesystem open a file with O_DIRECT and write an aligned block?"""
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return False
    import mmap

    path = os.path.join(directory, f".hf_zero_odirect_{os.getpid()}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | flag, 0o600)
    except OSError:
        return False
    try:
        buf = mmap.mmap(-1, 4096)   # page-aligned, as O_DIRECT requires
        os.write(fd, buf)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)


def environment() -> dict[str, str]:
    import torch
    import torch.distributed as dist

    info = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("hf_zero", "torch", "transformers", "accelerate", "peft", "safetensors", "datasets", "triton"):
        info[name] = _version(name)
    backends = [b for b, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available()),
                                ("mpi", dist.is_mpi_available())) if ok]
    info["distributed backends"] = ", ".join(backends) or "none"
    if torch.cuda.is_available():   # CUDA-only branch
        info["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        info["gpu"] = "none"
    triton_ok = not info["triton"].startswith("not usable")
    info["triton kernels"] = "usable" if triton_ok and torch.cuda.is_available() else (
        "installed; kernels run only on CUDA tensors (TRITON_INTERPRET=1 for tests)" if triton_ok else "not installed")
    info[f"O_DIRECT in {tempfile.gettempdir()}"] = "yes" if o_direct_usable(tempfile.gettempdir()) else "no"
    return info
