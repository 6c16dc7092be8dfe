"""Where torch runs: the device a role or a job asks for, its CPU threads, and bf16 autocast."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" is the GPU when there is one, else the CPU; anything else is taken as it is."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA GPU here (use cpu or auto)")
    return device


def set_threads(n: int) -> int:
    """Set torch's intra-op CPU threads (0 keeps torch's default); returns the previous count."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    return before


def autocast_enabled(device: torch.device, bf16: bool) -> bool:
    """bf16 autocast on CUDA, and on CPUs with native bf16 (AVX512-BF16 / AMX) where it is 2-3x faster."""
    if not bf16:
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)()) and _cpu_has_bf16()
    return False


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@contextmanager
def exact_float32() -> Iterator[None]:
    """CUDA matrix products and convolutions in float32 proper, not TF32 (which cuDNN uses for
    float32 convolutions by default on Ampere and later: a 10-bit mantissa). For numbers that must
    hold where the network is deployed, on a CPU: a model card's metrics and the thresholds chosen
    from them. The GPU-trained release's card, computed with TF32 allowed, held T2 0.375 where the
    same choice on the CPU gives 0.40 (TF32 the likely cause; not isolated). No-op without CUDA."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
