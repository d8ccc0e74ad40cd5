"""Peak extra resident memory of one forward + backward of grpo_loss, in a fresh process.

Run as `python -m tests._peak_memory MODE TRACE BACKEND` (MODE: eager | compiled | inplace;
TRACE: none | recent | both). Prints one JSON line: {"peak_mib": ..., "buffer_mib": ...}.
The logits are made inside the step by an LM head, logits = h @ W^T (a non-leaf, as in
training), so the peak counts the logits themselves plus whatever the loss adds: two (B, T, V)
buffers (logits and dlogits) at best without inplace_backward, one with it. Linux only: writing
5 to /proc/self/clear_refs resets the peak (VmHWM) to the current RSS, so the peak is measured
over the third call alone (after compilation and warm-up). Memory, not time: the figure does
not depend on machine load.
"""

from __future__ import annotations

import json
import sys

import torch

import lambda_grpo as lg

B, T, V, H = 8, 64, 32000, 16  # one (B, T, V) fp32 buffer = 62.5 MiB, far above allocator noise


def _status():
    with open("/proc/self/status") as f:
        d = dict(line.split(":", 1) for line in f)
    return int(d["VmRSS"].split()[0]) / 1024, int(d["VmHWM"].split()[0]) / 1024


def main() -> None:
    mode, trace, backend = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = lg.LossConfig(aggregation="dapo", trace=None if trace == "none" else trace, beta=0.05)
    tokens = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.1
    adv = torch.randn(B)
    old = torch.randn(B, T) - 10
    ref = torch.randn(B, T) - 10

    W = torch.randn(V, H) / H**0.5

    def step(h):
        logits = h @ W.T
        return lg.grpo_loss(logits, tokens, mask, adv, group_size=4, old_logp=old, ref_logp=ref, config=cfg,
                            backend=backend, inplace_backward=(mode == "inplace")).loss

    f = torch.compile(step, fullgraph=True) if mode == "compiled" else step
    peak = None
    for _ in range(3):
        x = torch.randn(B, T, H).requires_grad_(True)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        r0, _ = _status()
        f(x).backward()
        _, hwm = _status()
        peak = hwm - r0
        del x
    print(json.dumps({"peak_mib": peak, "buffer_mib": B * T * V * 4 / 2**20}))


if __name__ == "__main__":
    main()
