"""Where the time of one small training step goes on a GPU: `python -m bench.gpu_overhead`.

At small N the fused Triton step is far from the bandwidth floor (gpu_check: 2.1 ms at N = 2048,
V = 32 000, where the logits are 0.26 GB). This profiles one forward+backward of
grpo_loss(backend="triton") with torch.profiler and prints the host time per Python-visible
stage, the number of kernel launches and the device time per kernel, so that the fixed cost
(validation reads, token constants, launches) can be told from the vocabulary passes.
"""

from __future__ import annotations

import argparse
import time

import torch

import lambda_grpo as lg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=2048)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--backend", default="triton")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    B, T, V = 8, args.N // 8, args.V
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(B, T, V, generator=g).to(dev, torch.bfloat16)
    tokens = torch.randint(0, V, (B, T), generator=g).to(dev)
    mask = (torch.rand(B, T, generator=g) > 0.1).to(dev)
    adv = torch.randn(B, generator=g).to(dev)
    old = (torch.randn(B, T, generator=g) - 10).to(dev)
    ref = (torch.randn(B, T, generator=g) - 10).to(dev)
    cfg = lg.LossConfig(aggregation="dapo", beta=0.04, eps_high=0.28)

    def step():
        x = logits.detach().requires_grad_(True)
        lg.grpo_loss(x, tokens, mask, adv, group_size=4, old_logp=old, ref_logp=ref, config=cfg,
                     backend=args.backend).loss.backward()

    for _ in range(5):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"wall per step (host clock, 20 steps, synchronised): {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms")

    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(5):
            step()
        if dev == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=35, max_name_column_width=60))
    print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60))
    if dev == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(f"device events in 5 steps: {len(kernels)} ({len(kernels) / 5:.0f} per step)")


if __name__ == "__main__":
    main()
