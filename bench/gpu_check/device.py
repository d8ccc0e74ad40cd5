"""Section 1, device: GPU facts, versions, the code under test, and the measured device-to-device
copy bandwidth (bytes read + written per second of a 2 GiB `copy_`, far beyond L2): the yardstick
of every "% of copy bandwidth" in the timing section."""

from __future__ import annotations

import platform
import statistics
import subprocess
from typing import List, Tuple

import torch

from .common import GB, GiB, Budget, Plan, Results, cuda_clock

S = "device"
META_ROWS = ("python", "torch", "cuda", "triton", "liger_kernel", "trl", "transformers", "commit", "tree_hash",
             "git_head_here", "triton_interpret", "loadavg_start")


def nvidia_smi() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                              "clocks.max.mem", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "not available"


def measure_copy(P: Plan, reps: int = 20) -> Tuple[float, List[float]]:
    """Device-to-device copy of a large buffer (far beyond L2): bytes read + written per second."""
    n = P.copy_bytes
    src = torch.empty(n, dtype=torch.uint8, device=P.device).fill_(1)
    dst = torch.empty_like(src)
    clock = cuda_clock(P.device)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        a = clock.mark()
        dst.copy_(src)
        times.append(clock.between(a, clock.mark()))
    del src, dst
    return 2 * n / statistics.median(times), times


def run(P: Plan, R: Results, budget: Budget) -> None:
    if P.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        l2 = getattr(p, "L2_cache_size", 0) / 2**20
        R.add(S, "gpu", "INFO", value=f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                                      f"{p.total_memory / GiB:.1f} GiB, L2 {l2:.0f} MiB")
        R.add(S, "nvidia-smi", "INFO", value=nvidia_smi())
    else:
        R.add(S, "gpu", "SKIP", detail="dry run: no GPU facts (CPU: " + (platform.processor() or "?") + ")")
    for k in META_ROWS:
        R.add(S, k, "INFO", value=R.meta.get(k, "?"))
    bw, times = measure_copy(P)
    R.meta["copy_gbps"] = f"{bw / GB:.0f}"
    ms = [t * 1e3 for t in times]
    R.add(S, "copy bandwidth (device-to-device, read + write)", "OK", median_ms=statistics.median(ms),
          min_ms=min(ms), max_ms=max(ms), repeats=len(ms), bytes_model=2 * P.copy_bytes, gbps=bw / GB,
          frac_copy_bw=1.0, value=f"{bw / GB:.0f}", unit="GB/s",
          detail=f"torch copy_ of {P.copy_bytes / GiB:.2f} GiB; bytes = 2 x size")
    R.copy_bw = bw
