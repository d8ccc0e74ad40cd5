"""Benchmark cases (shape, dtype, loss mode) and the deterministic inputs every provider receives.

Every provider of a case is timed in its own subprocess; all of them rebuild the inputs from the
same seed, so they see bit-identical tensors without passing gigabytes between processes.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import torch

import lambda_grpo as lg

# The loss modes of the suite. "grpo" is DeepSeek-style GRPO with a k3 KL term (TRL loss_type
# "grpo", beta 0.04); "dapo" is DAPO's token-mean with clip-higher; "lambda_trace" is lambda-GRPO
# (learnable length weighting) with GRPO-lambda eligibility traces on the log-ratio; "lambda_both"
# the same with "both"-style traces.
MODES: Dict[str, dict] = {
    "grpo": dict(aggregation="grpo", beta=0.04),
    "dapo": dict(aggregation="dapo", eps_low=0.2, eps_high=0.28),
    "lambda_trace": dict(aggregation="lambda_grpo", trace="recent", trace_mode="ratio", trace_decay=0.99,
                         adv_clamp_min=-0.1),
    # lambda-GRPO with "both"-style ratio traces (decay 0.99): the two-pass schedule (the forward
    # keeps per-token coefficients, the backward recomputes the softmax), as in issue 9.
    "lambda_both": dict(aggregation="lambda_grpo", trace="both", trace_mode="ratio", trace_decay=0.99),
}
# A non-zero lambda so that the length weights f_i differ from 1 (lambda = 0 is exactly dapo).
LAM = 0.3
GROUP_SIZE = 4
LOGIT_SCALE = 2.0
# How far old/ref log-probs sit from the current policy: exp(0.3) ~ 1.35, so a realistic share of
# tokens is clipped and both branches of the clipped surrogate are exercised.
LOGP_NOISE = 0.3

# N = B * T -> (B, T): GRPO-like batches (B a multiple of the group size, T a completion length).
BT_FOR_N = {
    128: (4, 32),
    256: (4, 64),
    512: (4, 128),
    1024: (8, 128),
    2048: (8, 256),
    4096: (16, 256),
    8192: (16, 512),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """One measured configuration.

    task: "logits" (inputs are the (B, T, V) logits) or "hidden" (inputs are hidden states
    (B, T, H) and the LM-head weight (V, H); the providers include the matmul).
    """

    task: str
    V: int
    N: int
    dtype: str
    mode: str
    H: int = 0
    seed: int = 0

    @property
    def B(self) -> int:
        return BT_FOR_N[self.N][0]

    @property
    def T(self) -> int:
        return BT_FOR_N[self.N][1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def logits_bytes(self) -> int:
        """Bytes of one (N, V) tensor in the logits' dtype: the size of one dlogits buffer."""
        return self.N * self.V * self.itemsize

    def config(self) -> lg.LossConfig:
        return lg.LossConfig(**MODES[self.mode])

    def key(self) -> str:
        h = f"-H{self.H}" if self.task == "hidden" else ""
        return f"{self.task}-{self.mode}-{self.dtype}-V{self.V}-N{self.N}{h}"

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Case":
        return Case(**d)


def _chunked_logp(logits_fn, B: int, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[tokens] in fp32, one row of the batch at a time (no (N, V) fp32 temporary)."""
    rows = []
    for b in range(B):
        row = logits_fn(b).float()
        lse = torch.logsumexp(row, dim=-1)
        rows.append(row.gather(-1, tokens[b][:, None]).squeeze(-1) - lse)
    return torch.stack(rows)


def make_inputs(case: Case, cache_dir: Optional[str] = None) -> dict:
    """Deterministic inputs of a case.

    Returns a dict with tokens (B, T) int64, mask (B, T) bool (right-padded rows of random
    length in [T/4, T]), advantages (B,) fp32, old_logp (B, T) fp32, ref_logp (B, T) fp32 or
    None, group_size, lam (float or None); plus logits (B, T, V) in the case dtype for the
    "logits" task, or hidden (B, T, H) and weight (V, H) for the "hidden" task.

    cache_dir: where the current policy's per-token log-probs (the centre of old/ref) are kept
    between the processes of one run. They cost one full logits matmul in the hidden task (13 s
    per process at N = 4 096, V = 151 936, H = 896 here); everything else is regenerated from
    the seed, so the inputs are the same with or without the cache.
    """
    B, T, V = case.B, case.T, case.V
    g = torch.Generator().manual_seed(1000 + case.seed)
    dt = case.torch_dtype
    out: dict = {}
    if case.task == "logits":
        logits = torch.randn((B, T, V), generator=g, dtype=torch.float32).mul_(LOGIT_SCALE)
        if dt != torch.float32:
            logits = logits.to(dt)
        out["logits"] = logits

        def logits_fn(b):
            return logits[b]
    elif case.task == "hidden":
        H = case.H
        hidden = torch.randn((B, T, H), generator=g, dtype=torch.float32)
        weight = torch.randn((V, H), generator=g, dtype=torch.float32).mul_(LOGIT_SCALE / H**0.5)
        out["hidden"], out["weight"] = hidden.to(dt), weight.to(dt)

        def logits_fn(b):
            return out["hidden"][b] @ out["weight"].t()
    else:
        raise ValueError(f"task: expected 'logits' or 'hidden', got {case.task!r}")
    tokens = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    advantages = torch.randn(B, generator=g)
    path = None if cache_dir is None else os.path.join(cache_dir, f"logp-{case.key()}-s{case.seed}.pt")
    if path is not None and os.path.exists(path):
        logp = torch.load(path)
    else:
        with torch.no_grad():
            logp = _chunked_logp(logits_fn, B, tokens)
        if path is not None:
            os.makedirs(cache_dir, exist_ok=True)
            torch.save(logp, path + ".tmp")
            os.replace(path + ".tmp", path)
    old = logp + LOGP_NOISE * torch.randn(B, T, generator=g)
    ref = logp + LOGP_NOISE * torch.randn(B, T, generator=g)
    cfg = case.config()
    out.update(tokens=tokens, mask=mask, advantages=advantages, old_logp=old,
               ref_logp=ref if cfg.beta > 0 else None, group_size=GROUP_SIZE,
               lam=LAM if cfg.aggregation == "lambda_grpo" else None)
    return out


def hidden_memory_model(case: Case) -> dict:
    """The memory floor of the fused-linear job (a MODEL from the shapes, not a measurement):
    dW (V, H) in fp32 (the gradient is accumulated in fp32), dhidden (N, H) in the hidden dtype,
    and one chunk of logits (our chunk size, `lambda_grpo._linear.chunk_rows` on CPU) in fp32."""
    from lambda_grpo._linear import chunk_rows

    rows = min(chunk_rows(case.V, case.H, torch.device("cpu")), case.N)
    parts = {"dW": case.V * case.H * 4, "dhidden": case.N * case.H * case.itemsize,
             "chunk_logits": rows * case.V * 4}
    return {"rows": rows, "parts": parts, "bytes": sum(parts.values())}


def lam_leaf(inputs: dict) -> Optional[torch.Tensor]:
    """A fresh 0-d fp32 leaf for lambda (None when the mode has no lambda)."""
    if inputs["lam"] is None:
        return None
    return torch.tensor(float(inputs["lam"]), dtype=torch.float32, requires_grad=True)
