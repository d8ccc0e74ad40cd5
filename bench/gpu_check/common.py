"""What every section shares: the plan (sizes, repeats, budgets), the results table, time budgets,
the loss configurations and the inputs (drawn on the device, chunk by chunk).

Nothing here reaches into lambda_grpo's private modules (that is `internals.py`'s job).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

import lambda_grpo as lg

from ..cases import LOGIT_SCALE, LOGP_NOISE, _chunked_logp
from ..worker import Clock, MemProbe

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GB = 1e9
GiB = 1024**3
LAM = 0.3
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Peak bytes per logit of one float64 reference fwd+bwd (measured on the CPU with an RSS probe at
# V = 32 000: 48-50 B per element, inputs excluded), rounded up for the caching allocator.
REF_BYTES_PER_LOGIT = 56
REF_MEM_BUDGET = 60 * GB

# Loss configurations. "fused": dlogits written in the forward (no row coupling); "two-pass": a
# ratio-mode trace, the sequence ratio (GSPO) or VESPO's sequence weight, the backward recomputes
# the softmax from the row coefficients.
CFGS = {
    "dapo_fused": dict(aggregation="dapo", eps_low=0.2, eps_high=0.28, beta=0.04, entropy_coef=0.01,
                       temperature=0.9),
    "lambda_fused": dict(aggregation="lambda_grpo", beta=0.04, entropy_coef=0.01),
    "lambda_both_ratio": dict(aggregation="lambda_grpo", trace="both", trace_mode="ratio", beta=0.04,
                              entropy_coef=0.01, adv_clamp_min=-0.1),
    "lambda_recent_weight": dict(aggregation="lambda_grpo", trace="recent", trace_mode="weight", beta=0.04,
                                 entropy_coef=0.01),
    # every surrogate (clip is dapo_fused above), GSPO: issue 20 target 5
    "cispo": dict(aggregation="dapo", surrogate="cispo", eps_high=5.0, beta=0.04, entropy_coef=0.01),
    "cispo_two_sided": dict(aggregation="dapo", surrogate="cispo_two_sided", eps_low=0.2, eps_high=0.28, beta=0.04),
    "sapo": dict(aggregation="dapo", surrogate="sapo", beta=0.04, entropy_coef=0.01, temperature=0.9),
    "vespo": dict(aggregation="dapo", surrogate="vespo", beta=0.04),
    "gspo": dict(aggregation="grpo", importance_sampling="sequence", eps_low=3e-4, eps_high=4e-4, beta=0.04),
    # timing: what every peer can compute (DAPO token mean, clip-higher, k3 KL), and the two-pass one
    "t_dapo": dict(aggregation="dapo", eps_low=0.2, eps_high=0.28, beta=0.04),
    "t_lambda_both": dict(aggregation="lambda_grpo", trace="both", trace_mode="ratio", beta=0.04),
}


def cfg_of(name: str) -> lg.LossConfig:
    return lg.LossConfig(**CFGS[name])


def schedule_of(name: str) -> str:
    """"fused" or "two-pass": which vocabulary schedule a config runs (LossConfig.row_coupled)."""
    return "two-pass" if cfg_of(name).row_coupled else "fused"


# ------------------------------------------------------------------------------------------
# The plan: what the GPU run and the dry run measure
# ------------------------------------------------------------------------------------------
SECTIONS = ("device", "correct", "compile", "graph", "timing", "hidden", "rows")


@dataclass
class Plan:
    dry: bool
    device: str
    timer: str
    memory: str
    copy_bytes: int
    correct: List[Tuple[int, int, int, str, str]]  # (B, T, V, dtype, cfg): float64 checks, triton + torch
    variants: List[Tuple[int, int, int, str, str]]  # every surrogate, GSPO: float64 checks, triton
    packed: List[Tuple[int, int, int, str, str]]  # cu_seqlens inputs vs the padded float64 truth, triton
    long_rows: List[Tuple[int, int, int, str, str]]  # one row of T tokens, float64 truth, triton + torch
    long_trace: Optional[Tuple[int, int, int, str, str]]  # a ratio trace on the long row: vs the torch engine in f64
    agree: Tuple[int, int, int, str, Tuple[str, ...]]
    scalar_moves: int  # one-ulp moves of the inputs behind the scalar baseline
    compile_shape: Tuple[int, int, int, str]
    graph_shape: Tuple[int, int, int, str]
    graph_cfgs: Tuple[str, ...]
    timing: List[Tuple[int, int, int]]  # (B, T, V), bf16
    torch_engine_max_n: int  # our torch engine is timed only up to this N (a CPU design on a GPU)
    profile_shape: Tuple[int, int, int]  # where one step of each of ours is profiled (in place vs not)
    profile_providers: Tuple[str, ...]
    hidden_correct: List[Tuple[int, int, int, int, str, str]]  # (B, T, H, V, dtype, cfg)
    hidden_timing: List[Tuple[int, int, int, int]]  # (B, T, H, V), bf16
    rows: List[Tuple[int, int]]
    reps: Dict[str, float]
    budgets: Dict[str, float]
    pytest_args: List[str]
    pytest_skip: Optional[str]
    deadline_s: float  # no new work starts after this (seconds since the start)
    hard_limit_s: float  # the watchdog ends the process here


def _bt(N: int, T: int) -> Tuple[int, int]:
    return N // T, T


def ref_batch(V: int, budget: float = REF_MEM_BUDGET) -> Tuple[int, int]:
    """The largest (B, T = 256 or 512) whose float64 reference fits the memory budget, N <= 16 384."""
    best = (8, 256)
    for N in (2048, 4096, 6144, 8192, 12288, 16384):
        if N * V * REF_BYTES_PER_LOGIT <= budget:
            best = _bt(N, 256 if V > 100_000 else 512)
    return best


GPU_BUDGETS = dict(device=15, correct=125, pytest=200, compile=60, graph=20, timing=125, hidden=95, rows=15)


def gpu_plan(total_memory: Optional[int] = None) -> Plan:
    if total_memory is None:
        total_memory = torch.cuda.get_device_properties(0).total_memory
    # the float64 truth may use up to 60 GB, or 45% of a smaller GPU
    budget = min(REF_MEM_BUDGET, 0.45 * total_memory)
    correct = []
    for V in (32000, 151936):
        B, T = ref_batch(V, budget)
        for dtn in ("bf16", "fp32"):
            for c in ("dapo_fused", "lambda_both_ratio", "lambda_recent_weight"):
                correct.append((B, T, V, dtn, c))
    return Plan(
        dry=False, device="cuda", timer="CUDA events (device time)",
        memory="torch.cuda.max_memory_allocated above the allocated baseline", copy_bytes=2 * GiB,
        correct=correct,
        variants=[(8, 256, 151936, "bf16", c) for c in ("cispo", "cispo_two_sided", "sapo", "vespo", "gspo")],
        packed=[(16, 256, 32000, "bf16", c) for c in ("dapo_fused", "lambda_both_ratio")],
        # one row of 65 536 tokens (Liger's (B, L) grid stops at L = 65 535); V = 4096 keeps the float64
        # truth of 2 x 65 536 tokens at 30 GB
        long_rows=[(2, 65536, 4096, "bf16", c) for c in ("dapo_fused", "gspo")],
        long_trace=(2, 65536, 4096, "bf16", "lambda_both_ratio"),
        agree=(16, 1024, 151936, "bf16", ("dapo_fused", "lambda_both_ratio")),
        scalar_moves=2,
        compile_shape=(16, 256, 151936, "bf16"),
        graph_shape=(8, 256, 32000, "bf16"), graph_cfgs=("lambda_fused", "lambda_both_ratio"),
        timing=[(B, T, V) for B, T in ((8, 256), (16, 1024), (64, 1024)) for V in (32000, 151936)],
        torch_engine_max_n=2048, profile_shape=(16, 1024, 151936),
        profile_providers=("ours_triton_fused", "ours_triton_fused_inplace", "ours_triton_2pass",
                           "ours_triton_2pass_inplace"),
        hidden_correct=[(4, 256, 896, 151936, "bf16", c) for c in ("dapo_fused", "lambda_both_ratio")],
        hidden_timing=[(B, T, H, 151936) for B, T in ((16, 256), (16, 1024)) for H in (896, 2048)],
        rows=[(16, 1024), (64, 8192)],
        reps=dict(warmup=2, reps_min=3, reps_max=15, item_s=2.0, rows_reps=20, graph_reps=30,
                  hidden_warmup=1, hidden_reps_min=3, hidden_reps_max=10, hidden_item_s=1.5, floor_reps=5),
        budgets=dict(GPU_BUDGETS),
        pytest_args=["tests/test_triton.py", "tests/test_triton_int64.py"], pytest_skip=None,
        deadline_s=440, hard_limit_s=470)


def dry_plan() -> Plan:
    # The interpreter costs ~1 ms per program and kernel: every shape is tiny, every measurement
    # is one warm-up call and one timed call.
    correct = [(2, 4, 37, dtn, c) for dtn in ("bf16", "fp32")
               for c in ("dapo_fused", "lambda_both_ratio", "lambda_recent_weight")]
    correct.append((2, 4, 301, "bf16", "dapo_fused"))
    return Plan(
        dry=True, device="cpu", timer="time.perf_counter (CPU wall clock, dry run)",
        memory="process RSS high-water mark above the baseline (CPU, dry run)", copy_bytes=64 * 2**20,
        correct=correct,
        variants=[(4, 4, 37, "bf16", c) for c in ("cispo", "cispo_two_sided", "sapo", "vespo", "gspo")],
        packed=[(4, 6, 37, "bf16", c) for c in ("dapo_fused", "lambda_both_ratio")],
        long_rows=[(2, 32, 37, "bf16", c) for c in ("dapo_fused", "gspo")],
        long_trace=(2, 32, 37, "bf16", "lambda_both_ratio"),
        agree=(2, 8, 301, "bf16", ("dapo_fused", "lambda_both_ratio")),
        scalar_moves=2,
        compile_shape=(2, 4, 37, "bf16"),
        graph_shape=(4, 4, 37, "bf16"), graph_cfgs=("lambda_both_ratio",),
        timing=[(2, 4, 37), (2, 8, 101)], torch_engine_max_n=8, profile_shape=(2, 4, 37),
        profile_providers=("ours_triton_fused", "ours_triton_fused_inplace"),
        hidden_correct=[(2, 4, 8, 37, "bf16", c) for c in ("dapo_fused", "lambda_both_ratio")],
        hidden_timing=[(2, 4, 8, 37), (2, 8, 16, 37)],
        rows=[(2, 8), (4, 16)],
        reps=dict(warmup=1, reps_min=1, reps_max=1, item_s=0.0, rows_reps=1, graph_reps=1,
                  hidden_warmup=1, hidden_reps_min=1, hidden_reps_max=1, hidden_item_s=0.0, floor_reps=1),
        budgets=dict(device=10, correct=90, pytest=120, compile=60, graph=40, timing=60, hidden=40, rows=20),
        pytest_args=["tests/test_triton.py", "-k",
                     "test_bad_inputs_raise_value_error or test_nonfinite_logits_give_nonfinite_loss"],
        pytest_skip=("tests/test_triton_int64.py not run: it addresses a 2^31-element (4.3 GB) buffer; "
                     "the full interpreted suite takes minutes (it runs in `make test`)"),
        deadline_s=340, hard_limit_s=380)


# ------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------
COLUMNS = ["run_id", "gpu", "torch", "cuda", "triton", "liger_kernel", "trl", "code", "timer", "section", "name",
           "provider", "status", "dtype", "B", "T", "V", "H", "N", "n_valid", "median_ms", "min_ms", "max_ms",
           "repeats", "peak_mem_bytes", "peak_x_dlogits", "bytes_model", "gbps", "frac_copy_bw", "bytes_floor",
           "frac_floor", "value", "unit", "err", "allowed", "detail"]


@dataclass
class Results:
    plan: Plan
    out: str
    meta: Dict[str, str] = field(default_factory=dict)
    rows: List[dict] = field(default_factory=list)
    notes: Dict[str, List[str]] = field(default_factory=dict)
    timing: Dict[tuple, float] = field(default_factory=dict)  # (N, V, provider) -> median seconds
    copy_bw: Optional[float] = None  # measured bytes per second (read + write)
    extra: Dict[str, object] = field(default_factory=dict)  # what a section leaves for the report
    t_start: float = field(default_factory=time.monotonic)

    def add(self, section: str, name: str, status: str, **kw) -> dict:
        row = {"section": section, "name": name, "status": status, **kw}
        self.rows.append(row)
        bits = [f"[{section}] {status:<5} {name}"]
        if kw.get("provider"):
            bits.append(str(kw["provider"]))
        if kw.get("median_ms") is not None:
            bits.append(f"{kw['median_ms']:.3f} ms (min {kw['min_ms']:.3f}, max {kw['max_ms']:.3f}, "
                        f"n={kw['repeats']})")
        if kw.get("frac_copy_bw") is not None:
            bits.append(f"{kw['gbps']:.0f} GB/s = {100 * kw['frac_copy_bw']:.0f}% of copy")
        if kw.get("peak_mem_bytes") is not None:
            bits.append(f"peak +{kw['peak_mem_bytes'] / GiB:.3f} GiB")
        if kw.get("err") is not None:
            bits.append(f"err {kw['err']:.3g} / allowed {kw['allowed']:.3g}")
        if kw.get("value") is not None:
            bits.append(f"{kw['value']} {kw.get('unit', '')}".strip())
        if kw.get("detail"):
            bits.append(f"-- {kw['detail']}")
        print("  ".join(bits), flush=True)
        return row

    def note(self, section: str, text: str) -> None:
        self.notes.setdefault(section, []).append(text)
        print(f"[{section}] note: {text}", flush=True)

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    def elapsed(self) -> float:
        return time.monotonic() - self.t_start


class Budget:
    """A section's time: its own budget, and never past the run's deadline."""

    def __init__(self, seconds: float, deadline: Optional[float] = None):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        if deadline is not None:
            self.end = min(self.end, deadline)

    def left(self) -> float:
        return self.end - time.monotonic()

    def over(self) -> bool:
        return self.left() <= 0


def skip_spent(R: Results, section: str, name: str, **kw) -> None:
    R.add(section, name, "SKIP", detail="section time budget (or the run's deadline) spent", **kw)


def fail(R: Results, section: str, name: str, e: BaseException, **kw) -> None:
    tb = traceback.format_exc().strip().splitlines()
    print("\n".join(tb[-12:]), flush=True)
    R.add(section, name, "FAIL", detail=f"{type(e).__name__}: {str(e)[:400]}", **kw)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def dtn_of(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32" if dtype == torch.float32 else str(dtype)


def median_stats(times_s: List[float]) -> dict:
    ms = [t * 1e3 for t in times_s]
    return dict(median_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms), repeats=len(ms))


class Peak(MemProbe):
    """bench.worker's probe without its gc.collect() on CUDA (tens of ms per call in a process this
    large; the tensors of a step are freed by reference counting)."""

    def start(self) -> None:
        if self.device != "cuda":
            return super().start()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()


def free_bytes(device: str) -> Optional[int]:
    return torch.cuda.mem_get_info()[0] if device == "cuda" else None


def too_big(device: str, need: float, frac: float = 0.85) -> Optional[str]:
    """A reason to skip when `need` bytes exceed `frac` of the free device memory (None: it fits)."""
    free_b = free_bytes(device)
    if free_b is not None and need > frac * free_b:
        return f"expected ~{need / GiB:.1f} GiB > {100 * frac:.0f}% of the {free_b / GiB:.1f} GiB free"
    return None


# ------------------------------------------------------------------------------------------
# Inputs (drawn on the device: a (65 536, 151 936) batch would take minutes on the host)
# ------------------------------------------------------------------------------------------
FILL_CHUNK = 1 << 27  # elements per fp32 draw: 512 MB, so a bf16 batch never has an fp32 twin


def fill_normal_(x: torch.Tensor, g: torch.Generator, scale: float) -> torch.Tensor:
    """x <- N(0, scale^2) in x's dtype, drawn in fp32 chunks of rows (no full-size fp32 temporary)."""
    flat = x.view(-1, x.shape[-1])
    step = max(1, FILL_CHUNK // max(1, x.shape[-1]))
    for s in range(0, flat.shape[0], step):
        e = min(s + step, flat.shape[0])
        if x.dtype == torch.float32:
            torch.randn(flat[s:e].shape, generator=g, device=x.device, out=flat[s:e])
            flat[s:e].mul_(scale)
        else:
            flat[s:e].copy_(torch.randn(flat[s:e].shape, generator=g, device=x.device).mul_(scale))
    return x


def make_inputs(B: int, T: int, V: int, dtype: torch.dtype, device: str, seed: int, holes: float = 0.05,
                full_first: bool = False) -> dict:
    """A GRPO batch as grpo_loss keyword arguments (tests/_compare.run's layout): logits
    N(0, LOGIT_SCALE^2) in `dtype`, right-padded rows of random length in [T/4, T] (row 0 of
    length T, its last token valid, with full_first) with ~5% holes, per-sequence advantages,
    old/ref log-probs the current ones plus N(0, LOGP_NOISE^2) noise, groups of 4 (or B)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    logits = fill_normal_(torch.empty((B, T, V), dtype=dtype, device=device), g, LOGIT_SCALE)
    tokens = torch.randint(0, V, (B, T), generator=g, device=device)
    mask = random_mask(B, T, g, device, holes, full_first)
    adv = torch.randn(B, generator=g, device=device)
    with torch.no_grad():
        logp = _chunked_logp(lambda b: logits[b], B, tokens)
    old = logp + LOGP_NOISE * torch.randn((B, T), generator=g, device=device)
    ref = logp + LOGP_NOISE * torch.randn((B, T), generator=g, device=device)
    G = 4 if B % 4 == 0 else B
    return dict(logits=logits, tokens=tokens, mask=mask, advantages=adv, group_size=G, old_logp=old, ref_logp=ref)


def random_mask(B: int, T: int, g: torch.Generator, device: str, holes: float = 0.05,
                full_first: bool = False) -> torch.Tensor:
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g, device=device)
    if full_first:
        lengths[0] = T
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    mask &= torch.rand((B, T), generator=g, device=device) >= holes
    if full_first:
        mask[0, T - 1] = True
    return mask


def shape_of(inp: dict) -> dict:
    x = inp.get("logits")
    if x is None:
        B, T, H = inp["hidden"].shape
        return dict(B=B, T=T, H=H, V=inp["weight"].shape[0], N=B * T)
    B, T, V = x.shape
    return dict(B=B, T=T, V=V, N=B * T)


def ulp_moved(inputs: dict, seed: int, keys=("logits", "old_logp", "ref_logp"), upcast: bool = True) -> dict:
    """The inputs moved by one unit in the last place, in random directions: an equally valid input
    for plain torch. The scalar baseline takes plain torch's worst error over a few of these.

    upcast=True (the logits route): bf16/fp16 tensors are first taken to fp32 and moved by one fp32
    ulp, the precision of the arithmetic (the loss's math is fp32, and nothing rounds the given
    logits again: a bf16-ulp move would be a far larger, dishonest perturbation). upcast=False
    (the hidden route, tests/test_linear.py's `_ulp_moved`): one ulp of the tensor's own dtype,
    because there the logits are rounded to bf16 inside the computation (chunked matmuls round in
    another order than one matmul)."""
    out = dict(inputs)
    for i, k in enumerate(keys):
        v = inputs.get(k)
        if v is None:
            continue
        if upcast and v.dtype in (torch.bfloat16, torch.float16):
            v = v.float()
        g = torch.Generator(device=v.device)
        g.manual_seed(10_000 + 100 * seed + i)
        ity = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
               torch.float64: torch.int64}[v.dtype]
        # +-1 on the bit pattern is one ulp away from zero / towards zero (sign-magnitude floats);
        # zeros stay (-1 on +0 would be a NaN pattern)
        step = torch.randint(0, 2, v.shape, generator=g, device=v.device, dtype=ity).mul_(2).sub_(1)
        bits = v.view(ity)
        out[k] = torch.where(v == 0, bits, bits + step).view(v.dtype)
        del step, bits
    return out


def cuda_clock(device: str) -> Clock:
    return Clock(device)
