"""A MODEL (not a measurement) of the HBM bytes each design must move per token on a GPU.

No GPU is lent to this project, so the suite does not pretend to have timed one. Instead this
module states, per token of a fwd+bwd step, the bytes of vocabulary-sized traffic each design
implies, and the time that traffic takes at an H100's peak HBM bandwidth: a lower bound for a
memory-bound loss, and the expected ratio between designs.

How each row is obtained:
- ours (backend="triton") and the fused peers: from the passes their kernels make over the
  vocabulary, read off their source. SPEC §9 allows ours exactly three: the forward reads the
  logits once, the backward reads them once and writes dlogits once.
- eager designs (op-by-op autograd): by counting, not guessing. The provider's fwd+bwd runs once
  on a tiny CPU batch under a TorchDispatchMode that sees every aten op; each op that touches a
  vocabulary-sized tensor is charged one read of each such input and one write of each such
  output, as one kernel per op would on a GPU (views are free; gather/index read only what they
  return). Multi-pass kernels (a softmax reads its input twice) are charged once, so these rows
  are lower bounds for the eager designs.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .cases import Case, make_inputs

H100_HBM_BYTES_PER_S = 3.35e12  # H100 SXM5 (HBM3) datasheet peak
H100_NAME = "H100 SXM (3.35 TB/s HBM3, datasheet peak)"

_SPARSE_READ = {"gather", "index", "index_select", "take_along_dim"}


class _VocabTraffic(TorchDispatchMode):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.bytes = 0
        self.ops: Dict[str, int] = {}

    def _big(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab and t.numel() > self.vocab

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.overloadpacket.__name__ in ("detach", "alias", "_unsafe_view"):
            return out
        name = func.overloadpacket.__name__
        ins = [t for t in tree_flatten((args, kwargs or {}))[0] if self._big(t)]
        outs = [t for t in tree_flatten(out)[0] if self._big(t)]
        nbytes = sum(t.numel() * t.element_size() for t in outs)
        if name not in _SPARSE_READ:
            nbytes += sum(t.numel() * t.element_size() for t in ins)
        if nbytes:
            self.bytes += nbytes
            self.ops[name] = self.ops.get(name, 0) + nbytes
        return out


def counted_bytes_per_token(provider, dtype: str, mode: str, V: int = 1024) -> Dict[str, object]:
    """Vocabulary-sized bytes per token of one fwd+bwd of an eager provider, counted per aten op."""
    case = Case("logits", V, 128, dtype, mode)
    inputs = make_inputs(case)
    runner = provider.make(case, inputs, "cpu")
    mode_ = _VocabTraffic(V)
    with mode_:
        out = runner.forward()
        runner.run_backward(out)
    per_token = mode_.bytes / case.N
    itemsize = case.itemsize
    return {"bytes_per_token": per_token, "passes": per_token / (V * itemsize),
            "ops": {k: v / case.N / (V * itemsize) for k, v in sorted(mode_.ops.items(), key=lambda kv: -kv[1])}}


def model_rows(providers: List, V: int, dtype: str, mode: str, N: int) -> List[dict]:
    """One row per design: passes over (N, V), bytes per token, modelled H100 time at N tokens."""
    itemsize = 2 if dtype == "bf16" else 4
    by_name = {p.name: p for p in providers if p.task == "logits"}
    rows = []

    def add(design: str, passes: float, how: str):
        bpt = passes * V * itemsize
        rows.append({"design": design, "V": V, "dtype": dtype, "mode": mode, "N": N, "passes": passes,
                     "bytes_per_token": bpt, "h100_ms": bpt * N / H100_HBM_BYTES_PER_S * 1e3, "how": how})

    add("ours: backend='triton'", 3.0, "SPEC §9: fwd reads logits once; bwd reads once, writes dlogits once")
    add("Liger 0.8.5 triton_grpo_loss", 3.0,
        "kernel source: fwd one online-logsumexp loop over V; bwd one loop reading logits, writing dlogits")
    add("TRL 1.16 on CUDA (selective_log_softmax -> trl/kernels/logprob_entropy.py)", 3.0,
        "kernel source: fwd one loop over V; bwd one read, one write; the rest of the loss is (B, T)-sized")
    for name, design in (("eager_fp32", "eager plain torch fp32, op by op"),
                         ("trl", "TRL 1.16 torch path (what runs on CPU), op by op"),
                         ("reference", "eager reference (fp64 math), op by op")):
        p = by_name.get(name)
        if p is None or p.skip(Case("logits", V, 128, dtype, mode), "cpu"):
            continue
        c = counted_bytes_per_token(p, dtype, mode)
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(c["ops"].items())[:4])
        add(design, c["passes"], f"counted per aten op on CPU (lower bound); largest: {top}")
    ours = rows[0]["h100_ms"]
    for r in rows:
        r["x_ours"] = r["h100_ms"] / ours
    return rows
