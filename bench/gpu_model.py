"""A MODEL (not a measurement) of the HBM bytes each design must move per token on a GPU.

No GPU is lent to this project, so the suite does not pretend to have timed one. Instead this
module states, per token of a fwd+bwd step, the bytes of vocabulary-sized traffic each design
implies, and the time that traffic takes at an H100's peak HBM bandwidth: a lower bound for a
memory-bound loss, and the expected ratio between designs.

How each row is obtained:
- ours (backend="triton") and the fused peers: from the passes their kernels make over the
  vocabulary, read off their source (ours: `SCHEDULES` below, checked by counting): three, a
  valid row read twice and its dlogits written once, in the fused and the two-pass schedule.
- eager designs (op-by-op autograd): by counting, not guessing. The provider's fwd+bwd runs once
  on a tiny CPU batch under a TorchDispatchMode that sees every aten op; each op that touches a
  vocabulary-sized tensor is charged one read of each such input and one write of each such
  output, as one kernel per op would on a GPU (views are free; gather/index read only what they
  return). Multi-pass kernels (a softmax reads its input twice) are charged once, so these rows
  are lower bounds for the eager designs.

The GPU check (bench/gpu_check) takes its "% of copy bandwidth" from `SCHEDULES` below: the
vocabulary-sized bytes per row of each schedule, read off the kernels' source and CHECKED against
the kernels themselves by `measure_traffic()`, which runs a tiny step of each under the Triton
interpreter and counts every element each launch loads from the logits and stores to the
gradient (`python -m bench.gpu_model --traffic OUT.json`; the GPU check runs it, on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from typing import Dict, List, Optional

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

    add("ours: backend='triton'", 3.0, "kernel source, counted under the interpreter (bench/gpu_model.py:SCHEDULES): "
        "a valid row read twice, dlogits written once, fused or two-pass")
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


# ------------------------------------------------------------------------------------------
# The byte model of the GPU check: vocabulary-sized traffic per row, and its check by counting
# ------------------------------------------------------------------------------------------
# Per row of V logits: how many times the kernels read a valid row / a masked row in full, and
# write its gradient row. A MODEL of HBM traffic: a read the L2 serves (the fused kernel's second
# walk of a row, right after its first) is counted as a read.
SCHEDULES: Dict[str, dict] = {
    "fused": dict(reads_valid=2, writes_valid=1, reads_masked=0, writes_masked=1, source=(
        "lambda_grpo/kernels/vocab_fused.py: vocab_fused_kernel walks a valid row twice (online logsumexp and "
        "entropy, then the gradient tiles, right after, partly from L2) and writes its dlogits once; a masked "
        "row gets zeros written, nothing read; scale_kernel does nothing at g == 1")),
    "two-pass": dict(reads_valid=2, writes_valid=1, reads_masked=0, writes_masked=1, source=(
        "lambda_grpo/kernels/vocab_fwd.py + vocab_bwd.py: vocab_fwd_kernel reads a valid row once, "
        "vocab_bwd_kernel reads it again and writes dlogits once; a masked row gets zeros written")),
    "liger": dict(reads_valid=2, writes_valid=1, reads_masked=0, writes_masked=1, source=(
        "liger_kernel/ops/grpo_loss.py 0.8.5: _grpo_loss_fwd_kernel reads a valid row once, "
        "_grpo_loss_bwd_kernel reads it again and writes dlogits; a masked row gets zeros written")),
    "trl": dict(reads_valid=2, writes_valid=1, reads_masked=2, writes_masked=1, source=(
        "trl/kernels/logprob_entropy.py 1.16: selective_log_softmax passes no mask, so every row is read in "
        "the forward and again in the backward, and its gradient written (read off the source, not counted: "
        "TRL takes its torch path on a CPU)")),
}
# The least any fwd+bwd moves: each valid row read once, every gradient row written once.
FLOOR = dict(reads_valid=1, writes_valid=1, reads_masked=0, writes_masked=1)


def traffic_bytes(model: dict, n_valid: int, N: int, V: int, itemsize: int) -> int:
    """Vocabulary-sized bytes of one fwd+bwd under a per-row model (SCHEDULES or FLOOR)."""
    per_valid = model["reads_valid"] + model["writes_valid"]
    per_masked = model["reads_masked"] + model["writes_masked"]
    return int(V * itemsize * (n_valid * per_valid + (N - n_valid) * per_masked))


@contextmanager
def _counting_interpreter():
    """Record, per kernel launch under the Triton interpreter, its tensor arguments and every
    element address it loads and stores (masked lanes excluded)."""
    import numpy as np
    from triton.runtime import interpreter as itp

    launches: List[dict] = []
    call0, load0, store0 = (itp.GridExecutor.__call__, itp.InterpreterBuilder.create_masked_load,
                            itp.InterpreterBuilder.create_masked_store)

    def call(self, *args, **kwargs):
        bound = dict(zip(self.arg_names, args))
        bound.update(kwargs)
        tens = {}
        for k, v in bound.items():
            t = v if isinstance(v, torch.Tensor) else getattr(v, "base", None)
            if isinstance(t, torch.Tensor) and t.numel() > 0:
                tens[k] = (t.data_ptr(), t.numel())
        launches.append({"kernel": getattr(self.fn, "__name__", "?"), "args": tens, "loads": [], "stores": []})
        return call0(self, *args, **kwargs)

    def rec(kind, ptrs, mask):
        if launches:
            m = np.broadcast_to(mask.data, ptrs.data.shape)
            esize = ptrs.get_element_ty().primitive_bitwidth // 8
            launches[-1][kind].append((ptrs.data[m].astype(np.uint64), esize))

    def load(self, ptrs, mask, other, *a, **k):
        rec("loads", ptrs, mask)
        return load0(self, ptrs, mask, other, *a, **k)

    def store(self, ptrs, value, mask, *a, **k):
        rec("stores", ptrs, mask)
        return store0(self, ptrs, value, mask, *a, **k)

    itp.GridExecutor.__call__, itp.InterpreterBuilder.create_masked_load = call, load
    itp.InterpreterBuilder.create_masked_store = store
    try:
        yield launches
    finally:
        itp.GridExecutor.__call__, itp.InterpreterBuilder.create_masked_load = call0, load0
        itp.InterpreterBuilder.create_masked_store = store0


def _row_passes(launches: List[dict], t: torch.Tensor, kind: str, row_class: List[str], V: int) -> Dict[str, list]:
    """Full passes over each row of `t` (contiguous, rows of V elements) made by the launches'
    `kind` accesses ("loads" / "stores"), counting only launches that took a tensor (or a view of
    it) at t's address with t's size (a freed temporary at the same address is not t); per row
    class, [min, max]."""
    import numpy as np

    base, esize = t.data_ptr(), t.element_size()
    rows = t.numel() // V
    counts = np.zeros(rows * V, dtype=np.int64)
    for ln in launches:
        if not any(a == (base, t.numel()) for a in ln["args"].values()):
            continue
        for addrs, es in ln[kind]:
            off = addrs.astype(np.int64) - base
            hit = (off >= 0) & (off < rows * V * esize)
            if es == esize and hit.any():
                counts += np.bincount(off[hit] // esize, minlength=rows * V)
    per_row = counts.reshape(rows, V).min(axis=1)
    out: Dict[str, list] = {}
    for cls in sorted(set(row_class)):
        sel = per_row[np.asarray([c == cls for c in row_class])]
        out[cls] = [int(sel.min()), int(sel.max())] if sel.size else []
    return out


def measure_traffic(B: int = 2, T: int = 6, V: int = 301) -> Dict[str, dict]:
    """One tiny fwd+bwd of each schedule (and Liger's) under the Triton interpreter
    (TRITON_INTERPRET=1 set before lambda_grpo's kernels were imported), public API only; full
    passes per row of the logits read and of the gradient written."""
    import lambda_grpo as lg

    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(B, T, V, generator=g).to(torch.bfloat16)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[0, 0], mask[-1, -1] = True, False
    adv = torch.randn(B, generator=g)
    old = torch.randn(B, T, generator=g) - 4
    ref = torch.randn(B, T, generator=g) - 4
    cls = ["valid" if bool(v) else "masked" for v in mask.reshape(-1)]
    results: Dict[str, dict] = {}
    cfgs = {"fused": lg.LossConfig(aggregation="dapo", beta=0.04, eps_high=0.28),
            "two-pass": lg.LossConfig(aggregation="lambda_grpo", trace="both", trace_mode="ratio", beta=0.04)}
    for sched, cfg in cfgs.items():
        for inplace in (False, True):
            x = x0.clone().requires_grad_(True)
            lam = torch.tensor(0.3, requires_grad=True) if cfg.uses_lambda else None
            with _counting_interpreter() as launches:
                lg.grpo_loss(x, tokens, mask, adv, 2, old_logp=old, ref_logp=ref, lam=lam, config=cfg,
                             backend="triton", inplace_backward=inplace).loss.backward()
            results[sched + (" in place" if inplace else "")] = {
                "kernels": sorted({ln["kernel"] for ln in launches}),
                "reads": _row_passes(launches, x, "loads", cls, V),
                "writes": _row_passes(launches, x.grad, "stores", cls, V)}
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError as e:
        results["liger"] = {"skipped": f"liger-kernel not importable: {e}"}
        return results
    buf = torch.zeros(B, T + 1, V, dtype=torch.bfloat16)
    buf[:, :T] = x0
    buf.requires_grad_(True)
    with _counting_interpreter() as launches:
        loss, _ = triton_grpo_loss(buf, old, ref, tokens, adv, completion_mask=mask.to(torch.int32),
                                   temperature=1.0, beta=0.04, eps_low=0.2, eps_high=0.28, inplace=False,
                                   loss_type="dapo", reduce=True)
        loss.backward()
    lcls = [c for b in range(B) for c in cls[b * T:(b + 1) * T] + ["unused (position T)"]]
    results["liger"] = {"kernels": sorted({ln["kernel"] for ln in launches}),
                        "reads": _row_passes(launches, buf, "loads", lcls, V),
                        "writes": _row_passes(launches, buf.grad, "stores", lcls, V)}
    return results


def check_traffic(measured: Dict[str, dict]) -> List[dict]:
    """One verdict per schedule: the counted full passes against SCHEDULES."""
    out = []
    for key, got in measured.items():
        model = SCHEDULES.get(key.replace(" in place", ""))
        if model is None or "skipped" in got:
            out.append({"schedule": key, "ok": None, "detail": got.get("skipped", "no model")})
            continue
        want = {("reads", "valid"): model["reads_valid"], ("writes", "valid"): model["writes_valid"],
                ("reads", "masked"): model["reads_masked"], ("writes", "masked"): model["writes_masked"]}
        bad = [f"{k[0]} per {k[1]} row {got[k[0]].get(k[1])} != {v}" for k, v in want.items()
               if got[k[0]].get(k[1]) and got[k[0]][k[1]] != [v, v]]
        detail = (f"kernels {got['kernels']}; full passes per row [min, max]: reads {got['reads']}, writes "
                  f"{got['writes']}")
        out.append({"schedule": key, "ok": not bad,
                    "detail": detail + (f"; differs from the model: {bad}" if bad else "")})
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_model")
    ap.add_argument("--traffic", metavar="OUT_JSON", required=True,
                    help="count the kernels' row traffic under the Triton interpreter and write it as JSON")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("bench.gpu_model --traffic needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
        return 2
    try:
        measured = measure_traffic()
        result = {"measured": measured, "verdicts": check_traffic(measured)}
    except Exception as e:  # noqa: BLE001 - e.g. an interpreter that cannot run the kernels (Triton 3.6)
        import triton

        result = {"error": f"{type(e).__name__}: {str(e)[:300]} (triton {triton.__version__})"}
    with open(args.traffic + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.traffic + ".tmp", args.traffic)
    return 0


if __name__ == "__main__":
    sys.exit(main())
