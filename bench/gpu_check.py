"""GPU acceptance run in one command: ``python -m bench.gpu_check [--out DIR]`` (``make gpu-check``, needs CUDA).

Sections, each guarded (an exception becomes a FAIL row and the run goes on) and each with a
time budget, so that the whole run ends in about 7 minutes on an H100/H200:

1. device   GPU facts, versions, and the measured device-to-device copy bandwidth
            (bytes read + written per second, the yardstick of section 4).
2. correct  backend="triton" (compiled kernels, not the interpreter) and backend="torch" against
            the float64 reference on the same inputs at real sizes: bf16 and fp32 logits,
            V in {32 000, 151 936}, fused and two-pass schedules, traces, lambda-GRPO, KL,
            entropy, one long row (T = 8192 with a trace); tests/_compare.py's tolerance rule
            (error vs the float64 truth <= 2x that of plain torch in fp32 math on the same
            inputs), with the worst element; at N = 16 384, V = 151 936 (too large for a float64
            truth) triton against the torch backend. In parallel, in a subprocess:
            ``pytest tests/test_triton.py tests/test_triton_int64.py`` natively on CUDA
            (LG_TEST_DEVICE=cuda). The subprocess is waited for before anything is timed.
3. compile  torch.compile(fullgraph=True) with backend="triton": the graph calls
            lambda_grpo::loss_fwd with engine "triton", the Triton launchers and kernels run
            (engine call counts; CUDA profiler kernel names), loss and gradients equal eager,
            new lambda / advantages / lengths do not recompile, compiled vs eager peak memory.
4. timing   fwd+bwd per training step (fresh gradient each call): ours (triton fused and
            two-pass, with and without inplace_backward; torch backend), Liger's
            triton_grpo_loss, a TRL-style loss on TRL's selective_log_softmax kernel, eager
            torch (the reference in fp32 and in bf16 math). Median of repeats with CUDA events;
            achieved GB/s = 2 N V itemsize (read the logits once, write dlogits once: the least
            any fwd+bwd must move) / time, as a fraction of the measured copy bandwidth; peak
            extra memory from torch.cuda.max_memory_allocated.
5. rows     the Triton row kernel (lambda_grpo._vocab_triton.row_pass) vs the torch row math
            (lambda_grpo._rowmath.row_pass), and their share of a vocab fwd+bwd at the same N.

Outputs in --out: gpu_check.csv (one row per measurement or check), gpu_check.md,
gpu_check.png; the CSV and the Markdown are rewritten after every section, so a run cut short
keeps what it measured.

``--dry-run``: the same code path on the CPU under TRITON_INTERPRET=1 at tiny sizes (V 37-301,
N 8-64); times come from time.perf_counter (labelled), memory from the process RSS; what truly
needs CUDA is skipped with a printed reason. tests/test_gpu_check.py runs it.

Exit status: 0 when no row is FAIL (ERROR rows, a peer library failing, are listed but do not
fail the run), 1 otherwise, 2 when CUDA is absent and --dry-run was not given.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import faulthandler
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python bench/gpu_check.py` or an uninstalled checkout
    sys.path.insert(0, REPO)

import lambda_grpo as lg  # noqa: E402

from .cases import LOGIT_SCALE, LOGP_NOISE, _chunked_logp  # noqa: E402
from .run import _git, _liger_version, _loadavg, _version  # noqa: E402
from .worker import Clock, MemProbe  # noqa: E402

GB = 1e9
GiB = 1024**3
LAM = 0.3
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Peak bytes per logit of one float64 reference fwd+bwd (measured on the CPU with an RSS probe at
# V = 32 000: 48-50 B per element, inputs excluded), rounded up for the caching allocator.
REF_BYTES_PER_LOGIT = 56
REF_MEM_BUDGET = 60 * GB
OUR_KERNELS = ("vocab_fused_kernel", "vocab_fwd_kernel", "vocab_bwd_kernel", "row_kernel", "scale_kernel")

# Loss configurations. "fused": no ratio-mode trace, dlogits written in the forward;
# "two-pass": ratio-mode trace, the backward recomputes the softmax.
CFGS = {
    "dapo_fused": dict(aggregation="dapo", eps_low=0.2, eps_high=0.28, beta=0.04, entropy_coef=0.01,
                       temperature=0.9),
    "lambda_fused": dict(aggregation="lambda_grpo", beta=0.04, entropy_coef=0.01),
    "lambda_both_ratio": dict(aggregation="lambda_grpo", trace="both", trace_mode="ratio", beta=0.04,
                              entropy_coef=0.01, adv_clamp_min=-0.1),
    "lambda_recent_weight": dict(aggregation="lambda_grpo", trace="recent", trace_mode="weight", beta=0.04,
                                 entropy_coef=0.01),
    # timing: what every peer can compute (DAPO token mean, clip-higher, k3 KL), and the two-pass one
    "t_dapo": dict(aggregation="dapo", eps_low=0.2, eps_high=0.28, beta=0.04),
    "t_lambda_both": dict(aggregation="lambda_grpo", trace="both", trace_mode="ratio", beta=0.04),
}


def cfg_of(name: str) -> lg.LossConfig:
    return lg.LossConfig(**CFGS[name])


# ------------------------------------------------------------------------------------------
# Plan: what the GPU run and the dry run measure
# ------------------------------------------------------------------------------------------
@dataclass
class Plan:
    dry: bool
    device: str
    timer: str
    memory: str
    copy_bytes: int
    correct: List[Tuple[int, int, int, str, str]]  # (B, T, V, dtype, cfg)
    long_row: Tuple[int, int, int, str, str]
    agree: Tuple[int, int, int, str, Tuple[str, ...]]
    compile_shape: Tuple[int, int, int, str]
    timing: List[Tuple[int, int, int]]  # (B, T, V), bf16
    rows: List[Tuple[int, int]]
    reps: Dict[str, float]
    budgets: Dict[str, float]
    pytest_args: List[str]
    pytest_skip: Optional[str]
    hard_limit_s: float


def _bt(N: int, T: int) -> Tuple[int, int]:
    return N // T, T


def ref_batch(V: int, budget: float = REF_MEM_BUDGET) -> Tuple[int, int]:
    """The largest (B, T = 256) whose float64 reference fits the memory budget, N <= 16 384."""
    best = (8, 256)
    for N in (2048, 4096, 6144, 8192, 12288, 16384):
        if N * V * REF_BYTES_PER_LOGIT <= budget:
            best = _bt(N, 256 if V > 100_000 else 512)
    return best


def gpu_plan() -> Plan:
    # the float64 truth may use up to 60 GB, or 45% of a smaller GPU
    budget = min(REF_MEM_BUDGET, 0.45 * torch.cuda.get_device_properties(0).total_memory)
    correct = []
    for V in (32000, 151936):
        B, T = ref_batch(V, budget)
        for dtn in ("bf16", "fp32"):
            for c in ("dapo_fused", "lambda_both_ratio", "lambda_recent_weight"):
                correct.append((B, T, V, dtn, c))
    return Plan(
        dry=False, device="cuda", timer="CUDA events (device time)",
        memory="torch.cuda.max_memory_allocated above the allocated baseline", copy_bytes=2 * GiB,
        correct=correct, long_row=(2, 8192, 32000, "bf16", "lambda_both_ratio"),
        agree=(16, 1024, 151936, "bf16", ("dapo_fused", "lambda_both_ratio")),
        compile_shape=(16, 256, 151936, "bf16"),
        timing=[(8, 256, 32000), (8, 256, 151936), (16, 1024, 32000), (16, 1024, 151936)],
        rows=[(16, 1024), (64, 8192)],
        reps=dict(warmup=2, reps_min=3, reps_max=15, item_s=2.5, rows_reps=20),
        budgets=dict(device=20, correct=110, pytest=200, compile=70, timing=130, rows=25),
        pytest_args=["tests/test_triton.py", "tests/test_triton_int64.py"], pytest_skip=None, hard_limit_s=470)


def dry_plan() -> Plan:
    # The interpreter costs ~1 ms per program and kernel: every shape is tiny, every measurement
    # is one warm-up call and one timed call.
    correct = [(2, 4, 37, dtn, c) for dtn in ("bf16", "fp32")
               for c in ("dapo_fused", "lambda_both_ratio", "lambda_recent_weight")]
    correct.append((2, 4, 301, "bf16", "dapo_fused"))
    return Plan(
        dry=True, device="cpu", timer="time.perf_counter (CPU wall clock, dry run)",
        memory="process RSS high-water mark above the baseline (CPU, dry run)", copy_bytes=64 * 2**20,
        correct=correct, long_row=(2, 32, 37, "bf16", "lambda_both_ratio"),
        agree=(2, 8, 301, "bf16", ("dapo_fused", "lambda_both_ratio")),
        compile_shape=(2, 4, 37, "bf16"),
        timing=[(2, 4, 37), (2, 8, 101)],
        rows=[(2, 8), (4, 16)],
        reps=dict(warmup=1, reps_min=1, reps_max=1, item_s=0.0, rows_reps=1),
        budgets=dict(device=10, correct=60, pytest=120, compile=60, timing=60, rows=20),
        pytest_args=["tests/test_triton.py", "-k",
                     "test_bad_inputs_raise_value_error or test_nonfinite_logits_give_nonfinite_loss"],
        pytest_skip=("tests/test_triton_int64.py not run: it addresses a 2^31-element (4.3 GB) buffer; "
                     "the full interpreted suite takes minutes (it runs in `make test`)"),
        hard_limit_s=600)


# ------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------
COLUMNS = ["run_id", "gpu", "torch", "cuda", "triton", "liger_kernel", "trl", "timer", "section", "name",
           "provider", "status", "dtype", "B", "T", "V", "N", "median_ms", "min_ms", "max_ms", "repeats",
           "peak_mem_bytes", "peak_x_dlogits", "bytes_min", "gbps", "frac_copy_bw", "value", "unit", "err",
           "allowed", "detail"]


@dataclass
class Results:
    plan: Plan
    out: str
    meta: Dict[str, str] = field(default_factory=dict)
    rows: List[dict] = field(default_factory=list)
    notes: Dict[str, List[str]] = field(default_factory=dict)
    timing: Dict[tuple, float] = field(default_factory=dict)  # (N, V, provider) -> median seconds
    copy_bw: Optional[float] = None  # measured bytes per second (read + write)

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


class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def over(self) -> bool:
        return self.left() <= 0


def _fail(R: Results, section: str, name: str, e: BaseException, **kw) -> None:
    tb = traceback.format_exc().strip().splitlines()
    print("\n".join(tb[-12:]), flush=True)
    R.add(section, name, "FAIL", detail=f"{type(e).__name__}: {str(e)[:400]}", **kw)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------
# Inputs (drawn on the device: a (16 384, 151 936) batch would take minutes on the host)
# ------------------------------------------------------------------------------------------
def make_inputs(B: int, T: int, V: int, dtype: torch.dtype, device: str, seed: int, holes: float = 0.05,
                full_first: bool = False) -> dict:
    """A GRPO batch as grpo_loss keyword arguments (tests/_compare.run's layout): logits
    N(0, LOGIT_SCALE^2) in `dtype`, right-padded rows of random length in [T/4, T] (row 0 of
    length T with full_first) with ~5% holes, per-sequence advantages, old/ref log-probs the
    current ones plus N(0, LOGP_NOISE^2) noise, groups of 4 (or B)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    x = torch.randn((B, T, V), generator=g, device=device, dtype=torch.float32).mul_(LOGIT_SCALE)
    logits = x if dtype == torch.float32 else x.to(dtype)
    del x
    tokens = torch.randint(0, V, (B, T), generator=g, device=device)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g, device=device)
    if full_first:
        lengths[0] = T
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    mask &= torch.rand((B, T), generator=g, device=device) >= holes
    adv = torch.randn(B, generator=g, device=device)
    with torch.no_grad():
        logp = _chunked_logp(lambda b: logits[b], B, tokens)
    old = logp + LOGP_NOISE * torch.randn((B, T), generator=g, device=device)
    ref = logp + LOGP_NOISE * torch.randn((B, T), generator=g, device=device)
    G = 4 if B % 4 == 0 else B
    return dict(logits=logits, tokens=tokens, mask=mask, advantages=adv, group_size=G, old_logp=old, ref_logp=ref)


def _shape(inp: dict) -> dict:
    B, T, V = inp["logits"].shape
    return dict(B=B, T=T, V=V, N=B * T)


# ------------------------------------------------------------------------------------------
# 1. device facts and copy bandwidth
# ------------------------------------------------------------------------------------------
def _nvidia_smi() -> str:
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
    clock = Clock(P.device)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        a = clock.mark()
        dst.copy_(src)
        times.append(clock.between(a, clock.mark()))
    del src, dst
    return 2 * n / statistics.median(times), times


def section_device(P: Plan, R: Results, budget: Budget) -> None:
    S = "device"
    if P.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        R.add(S, "gpu", "INFO", value=f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                                      f"{p.total_memory / GiB:.1f} GiB")
        R.add(S, "nvidia-smi", "INFO", value=_nvidia_smi())
    else:
        R.add(S, "gpu", "SKIP", detail="dry run: no GPU facts (CPU: " + (platform.processor() or "?") + ")")
    for k in ("python", "torch", "cuda", "triton", "liger_kernel", "trl", "transformers", "git_commit",
              "triton_interpret", "loadavg_start"):
        R.add(S, k, "INFO", value=R.meta.get(k, "?"))
    bw, times = measure_copy(P)
    R.meta["copy_gbps"] = f"{bw / GB:.0f}"
    ms = [t * 1e3 for t in times]
    R.add(S, "copy bandwidth (device-to-device, read + write)", "OK", median_ms=statistics.median(ms),
          min_ms=min(ms), max_ms=max(ms), repeats=len(ms), bytes_min=2 * P.copy_bytes, gbps=bw / GB,
          frac_copy_bw=1.0, value=f"{bw / GB:.0f}", unit="GB/s",
          detail=f"torch copy_ of {P.copy_bytes / GiB:.2f} GiB; bytes = 2 x size")
    R.copy_bw = bw


# ------------------------------------------------------------------------------------------
# 2. correctness against the float64 reference
# ------------------------------------------------------------------------------------------
def _worst(got: torch.Tensor, truth: torch.Tensor, base: torch.Tensor) -> str:
    if got.numel() <= 1:
        return f"got {float(got):.9g}, truth {float(truth):.9g}, plain torch {float(base):.9g}"
    d = (got.double() - truth.double()).abs().nan_to_num(nan=math.inf).reshape(-1)
    i = int(torch.argmax(d))
    del d
    idx = []
    for s in reversed(got.shape):
        idx.append(i % s)
        i //= s
    idx = tuple(reversed(idx))
    return (f"worst at {idx}: got {float(got[idx]):.6g}, truth {float(truth[idx]):.9g}, "
            f"plain torch {float(base[idx]):.6g}")


def compare_to_truth(name: str, got, truth, base, dtype) -> Tuple[bool, float, float, str]:
    """tests/_compare.py's rule decides; err/allowed are its max-norm quantities, for the report."""
    from tests._compare import ATOL, FACTOR, RTOL, assert_close_to_truth, max_err

    err = max_err(got, truth)
    scale = float(truth.double().abs().nan_to_num(0, 0, 0).max()) if truth.numel() else 0.0
    allowed = FACTOR * max_err(base, truth) + ATOL[dtype] + RTOL[dtype] * scale
    try:
        assert_close_to_truth(name, got, truth, base, dtype)
        ok, msg = True, ""
    except AssertionError as e:
        ok, msg = False, str(e)
    return ok, err, allowed, msg


def check_backends(R: Results, inp: dict, cfg_name: str, lam: float, backends=("triton", "torch"),
                   tag: str = "") -> None:
    from tests._compare import max_err, run

    S = "correct"
    cfg = cfg_of(cfg_name)
    dtype = inp["logits"].dtype
    dtn = "bf16" if dtype == torch.bfloat16 else "fp32"
    shp = _shape(inp)
    truth = run("reference", inp, cfg, lam, dtype=torch.float64)
    base = run("reference", inp, cfg, lam, dtype=torch.float32)
    for backend in backends:
        name = f"{tag}{cfg_name} vs float64"
        try:
            got = run(backend, inp, cfg, lam)
        except Exception as e:  # noqa: BLE001
            _fail(R, S, name, e, provider=backend, dtype=dtn, **shp)
            continue
        for q in ("loss", "dlogits", "dlam"):
            if truth[q] is None:
                continue
            ok, err, allowed, msg = compare_to_truth(q, got[q], truth[q], base[q], dtype)
            detail = _worst(got[q], truth[q], base[q]) + ("" if ok else f"; {msg}")
            R.add(S, f"{name}: {q}", "PASS" if ok else "FAIL", provider=backend, dtype=dtn, err=err,
                  allowed=allowed, detail=detail, **shp)
        # metrics: clip fractions may flip one boundary token (tests/_compare.py assert_backend_matches)
        n = max(1, int(inp["mask"].sum()))
        worst, bad = (0.0, "", 0.0, 0.0), []
        if set(got["metrics"]) != set(truth["metrics"]):
            bad.append(f"keys {sorted(got['metrics'])} != {sorted(truth['metrics'])}")
        for k in truth["metrics"]:
            if k not in got["metrics"]:
                continue
            g, t, b = got["metrics"][k], truth["metrics"][k], base["metrics"][k]
            if k.startswith("clip_frac"):
                err, allowed = max_err(g, t), max_err(b, t) * 2.0 + 1.0 / n + 1e-6
                ok = err <= allowed
            else:
                ok, err, allowed, _ = compare_to_truth(k, g, t, b, dtype)
            if not ok:
                bad.append(f"{k}: err {err:.3g} > {allowed:.3g}")
            ratio = err / allowed if allowed > 0 else math.inf
            if ratio >= worst[0]:
                worst = (ratio, k, err, allowed)
        R.add(S, f"{name}: metrics", "PASS" if not bad else "FAIL", provider=backend, dtype=dtn, err=worst[2],
              allowed=worst[3], detail="; ".join(([f"worst: {worst[1]}"] if worst[1] else []) + bad), **shp)
        del got
    del truth, base


def check_agreement(R: Results, inp: dict, cfg_name: str, lam: float) -> None:
    """No float64 truth at this size: triton against the torch backend, both fp32 math."""
    from tests._compare import max_err, run

    S = "correct"
    cfg = cfg_of(cfg_name)
    dtype = inp["logits"].dtype
    dtn = "bf16" if dtype == torch.bfloat16 else "fp32"
    shp = _shape(inp)
    a = run("triton", inp, cfg, lam)
    b = run("torch", inp, cfg, lam)
    # each rounds its fp32 gradient to the logits' dtype once: allow two units in the last place
    # of the largest gradient (a bf16 ulp is at most 2^-7 of the value, an fp32 one 2^-23)
    ulp = 2.0**-6 if dtype == torch.bfloat16 else 2.0**-21
    name = f"{cfg_name} triton vs torch backend (no float64 truth at this N)"
    finite = all(bool(torch.isfinite(a[q]).all()) for q in ("loss", "dlogits"))
    R.add(S, f"{name}: finite", "PASS" if finite else "FAIL", provider="triton", dtype=dtn, **shp)
    for q, tol in (("loss", 1e-4), ("dlogits", ulp), ("dlam", 1e-3)):
        if a[q] is None:
            continue
        err = max_err(a[q], b[q])
        allowed = tol * max(float(b[q].double().abs().max()), 1e-30)
        R.add(S, f"{name}: {q}", "PASS" if err <= allowed else "FAIL", provider="triton", dtype=dtn, err=err,
              allowed=allowed, detail=_worst(a[q], b[q], b[q]).replace("truth", "torch backend"), **shp)
    errs = {k: max_err(a["metrics"][k], b["metrics"][k]) / max(float(b["metrics"][k].double().abs().max()), 1e-6)
            for k in b["metrics"] if not k.startswith("clip_frac")}
    n = max(1, int(inp["mask"].sum()))
    clip = {k: max_err(a["metrics"][k], b["metrics"][k]) for k in b["metrics"] if k.startswith("clip_frac")}
    bad = [k for k, v in errs.items() if v > 1e-4] + [k for k, v in clip.items() if v > 4.0 / n]
    worst = max(errs, key=errs.get)
    R.add(S, f"{name}: metrics", "PASS" if not bad else "FAIL", provider="triton", dtype=dtn, err=errs[worst],
          allowed=1e-4, detail=f"worst relative: {worst}" + (f"; off: {bad}" if bad else ""), **shp)


def start_pytest(P: Plan, R: Results) -> Optional[Tuple[subprocess.Popen, str, float]]:
    """The Triton test files in a subprocess (natively on CUDA: LG_TEST_DEVICE=cuda, no interpreter)."""
    env = dict(os.environ)
    env["LG_TEST_DEVICE"] = P.device
    if P.device == "cuda":
        env.pop("TRITON_INTERPRET", None)
    path = os.path.join(R.out, "pytest.log")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *P.pytest_args]
    R.note("correct", f"started `{' '.join(cmd[1:])}` with LG_TEST_DEVICE={P.device}"
                      f"{'' if P.device == 'cuda' else ' (interpreter)'}; full output in pytest.log")
    with open(path, "w") as log:
        # its own session: a timeout ends the whole group (test_triton_int64 starts a child python)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, path, time.monotonic()


def finish_pytest(P: Plan, R: Results, handle, timeout: float) -> None:
    S = "correct"
    proc, path, t0 = handle
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, 9)
        except OSError:
            proc.kill()
        proc.wait()
        rc = None
    with open(path, errors="replace") as f:
        text = f.read()
    lines = text.strip().splitlines()
    print("----- pytest output (tail; all of it in pytest.log) -----\n" + "\n".join(lines[-60:]) +
          "\n--------------------------------", flush=True)
    summary = next((ln for ln in reversed(lines) if (" passed" in ln or " failed" in ln or " error" in ln)), "")
    name = "pytest " + " ".join(P.pytest_args)
    if rc is None:
        R.add(S, name, "FAIL", value=f"{time.monotonic() - t0:.0f}", unit="s",
              detail=f"killed, still running {time.monotonic() - t0:.0f} s after it started (budget "
                     f"{P.budgets['pytest']:.0f} s); last line: {lines[-1] if lines else ''}")
    else:
        R.add(S, name, "PASS" if rc == 0 else "FAIL", value=f"{time.monotonic() - t0:.0f}", unit="s",
              detail=f"exit {rc}: {summary.strip('= ')}")
    if P.pytest_skip:
        R.add(S, "pytest tests/test_triton_int64.py", "SKIP", detail=P.pytest_skip)


def section_correct(P: Plan, R: Results, budget: Budget) -> None:
    S = "correct"
    dev = P.device
    for i, (B, T, V, dtn, c) in enumerate(P.correct):
        if budget.over():
            R.add(S, f"{c} V={V} {dtn}", "SKIP", detail="section time budget spent", B=B, T=T, V=V, N=B * T)
            continue
        try:
            inp = make_inputs(B, T, V, DTYPES[dtn], dev, seed=100 + i)
            check_backends(R, inp, c, LAM)
        except Exception as e:  # noqa: BLE001
            _fail(R, S, f"{c} V={V} {dtn}", e, B=B, T=T, V=V, N=B * T, dtype=dtn)
        inp = None
        _free(dev)
    B, T, V, dtn, c = P.long_row
    if budget.over():
        R.add(S, "long row", "SKIP", detail="section time budget spent")
    else:
        try:
            inp = make_inputs(B, T, V, DTYPES[dtn], dev, seed=200, full_first=True)
            check_backends(R, inp, c, LAM, tag=f"long row T={T}: ")
        except Exception as e:  # noqa: BLE001
            _fail(R, S, f"long row T={T}", e, B=B, T=T, V=V, N=B * T, dtype=dtn)
        inp = None
        _free(dev)
    B, T, V, dtn, cfgs = P.agree
    for j, c in enumerate(cfgs):
        if budget.over():
            R.add(S, f"agreement {c} N={B * T}", "SKIP", detail="section time budget spent")
            continue
        try:
            inp = make_inputs(B, T, V, DTYPES[dtn], dev, seed=300 + j)
            check_agreement(R, inp, c, LAM)
        except Exception as e:  # noqa: BLE001
            _fail(R, S, f"agreement {c} N={B * T}", e, B=B, T=T, V=V, N=B * T, dtype=dtn)
        inp = None
        _free(dev)


# ------------------------------------------------------------------------------------------
# 3. torch.compile(fullgraph=True) with backend="triton"
# ------------------------------------------------------------------------------------------
@contextmanager
def counting_engine():
    """Count calls of the Triton engine's launchers (the custom ops look them up at run time)."""
    import lambda_grpo._vocab_triton as vt

    counts: Counter = Counter()
    saved = {}
    for name in ("vocab_fused", "vocab_forward", "vocab_backward", "row_pass", "scale_"):
        f = getattr(vt, name)
        saved[name] = f

        def wrapped(*a, _f=f, _n=name, **k):
            counts[_n] += 1
            return _f(*a, **k)

        setattr(vt, name, wrapped)
    try:
        yield counts
    finally:
        for name, f in saved.items():
            setattr(vt, name, f)


class Peak(MemProbe):
    """bench.worker's probe without its gc.collect() on CUDA (tens of ms per call in a process this
    large; the tensors of a step are freed by reference counting)."""

    def start(self) -> None:
        if self.device != "cuda":
            return super().start()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()


def _peak_step(P: Plan, fn, x0: torch.Tensor) -> int:
    x = x0.detach().clone().requires_grad_(True)
    probe = Peak(P.device)
    probe.start()
    fn(x).backward()
    peak = probe.peak()
    del x
    return peak


def section_compile(P: Plan, R: Results, budget: Budget) -> None:
    S = "compile"
    from torch._dynamo.backends.registry import lookup_backend
    from torch._inductor.compile_fx import compile_fx

    aot_eager = lookup_backend("aot_eager")
    if P.dry:
        R.note(S, "dry run: the compiled graph runs through AOTAutograd with the aot_eager backend; inductor's "
                  "code generation (a C++ build on the CPU) is left to the GPU run")
    B, T, V, dtn = P.compile_shape
    dtype = DTYPES[dtn]
    dev = P.device
    inp = make_inputs(B, T, V, dtype, dev, seed=400)
    shp = _shape(inp)
    dl_bytes = inp["logits"].numel() * inp["logits"].element_size()
    for key, c in (("fused", "lambda_fused"), ("two-pass", "lambda_both_ratio")):
        if budget.over():
            R.add(S, f"{key} ({c})", "SKIP", detail="section time budget spent", **shp)
            continue
        name = f"{key} ({c})"
        try:
            torch._dynamo.reset()
            graphs = []

            def backend(gm, example_inputs):
                graphs.append(gm)
                if P.dry:  # AOTAutograd without inductor's code generation (a C++ build on the CPU, ~25 s)
                    return aot_eager(gm, example_inputs)
                return compile_fx(gm, example_inputs)

            loss_fn = lg.GRPOLoss(cfg_of(c), backend="triton").to(dev)
            with torch.no_grad():
                loss_fn.lam.fill_(LAM)

            def step(x, mask, adv):
                return loss_fn(x, inp["tokens"], mask, adv, group_size=inp["group_size"], old_logp=inp["old_logp"],
                               ref_logp=inp["ref_logp"]).loss

            compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)
            mask, adv = inp["mask"], inp["advantages"]

            xe = inp["logits"].detach().clone().requires_grad_(True)
            le = step(xe, mask, adv)
            le.backward()
            dlam_e, loss_fn.lam.grad = loss_fn.lam.grad, None
            t0 = time.perf_counter()
            with counting_engine() as counts:
                xc = inp["logits"].detach().clone().requires_grad_(True)
                lc = compiled(xc, mask, adv)
                lc.backward()
                _sync(dev)
            dlam_c, loss_fn.lam.grad = loss_fn.lam.grad, None
            R.add(S, f"{name}: first compiled step", "OK", value=f"{time.perf_counter() - t0:.1f}", unit="s",
                  detail="dynamo + " + ("aot_eager" if P.dry else "inductor") + " compile included", dtype=dtn,
                  **shp)
            # (a) the graph calls our op with the Triton engine
            ops = [n for g in graphs for n in g.graph.nodes
                   if n.op == "call_function" and "lambda_grpo.loss_fwd" in str(n.target)]
            engines = [a for n in ops for a in list(n.args) + list(n.kwargs.values()) if a in ("triton", "torch")]
            ok = len(graphs) == 1 and len(ops) == 1 and engines == ["triton"]
            R.add(S, f"{name}: graph calls lambda_grpo::loss_fwd(engine='triton')", "PASS" if ok else "FAIL",
                  dtype=dtn, detail=f"{len(graphs)} graph(s), loss_fwd nodes {len(ops)}, engine args {engines}",
                  **shp)
            # (b) the Triton launchers ran inside the compiled step
            want = ("vocab_fused",) if key == "fused" else ("vocab_forward", "row_pass", "vocab_backward")
            ok = all(counts[w] > 0 for w in want)
            R.add(S, f"{name}: Triton engine ran", "PASS" if ok else "FAIL", dtype=dtn,
                  detail="calls: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), **shp)
            # (c) and launched the kernels (the CUDA profiler's view)
            if dev == "cuda":
                try:
                    from torch.profiler import ProfilerActivity, profile

                    x = inp["logits"].detach().clone().requires_grad_(True)
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        compiled(x, mask, adv).backward()
                        _sync(dev)
                    loss_fn.lam.grad = None
                    names = {e.key for e in prof.key_averages()}
                    ours = sorted({k for n in names for k in OUR_KERNELS if k in n})
                    if not names:
                        R.add(S, f"{name}: CUDA kernels launched", "INFO", dtype=dtn,
                              detail="the profiler recorded no CUDA kernels (CUPTI unavailable?)", **shp)
                    else:
                        R.add(S, f"{name}: CUDA kernels launched", "PASS" if ours else "FAIL", dtype=dtn,
                              detail=f"ours: {ours}; {len(names)} kernel names in all", **shp)
                    del x
                except Exception as e:  # noqa: BLE001
                    R.add(S, f"{name}: CUDA kernels launched", "INFO", dtype=dtn,
                          detail=f"profiler unavailable: {type(e).__name__}: {e}", **shp)
            else:
                R.add(S, f"{name}: CUDA kernels launched", "SKIP", detail="dry run: no CUDA profiler", **shp)
            # (d) same loss and gradients as eager (the same kernels run in both)
            from tests._compare import max_err

            tol = 2.0**-8 if dtype == torch.bfloat16 else 1e-5
            for q, a, b in (("loss", lc, le), ("dlogits", xc.grad, xe.grad), ("dlam", dlam_c, dlam_e)):
                if a is None or b is None:
                    R.add(S, f"{name}: compiled vs eager {q}", "FAIL", dtype=dtn,
                          detail=f"no {q}: compiled {a is not None}, eager {b is not None}", **shp)
                    continue
                err = max_err(a.detach(), b.detach())
                allowed = 1e-5 * max(float(b.detach().double().abs().max()), 1e-30) if q != "dlogits" else \
                    tol * float(b.double().abs().max())
                R.add(S, f"{name}: compiled vs eager {q}", "PASS" if err <= allowed else "FAIL", dtype=dtn, err=err,
                      allowed=allowed, **shp)
            del xe, xc, le, lc
            # (e) new lambda, advantages, lengths: no recompilation, and the values reach the graph
            g = torch.Generator(device=dev)
            g.manual_seed(401)
            lengths = torch.randint(T // 4, T + 1, (B,), generator=g, device=dev)
            new_mask = torch.arange(T, device=dev)[None, :] < lengths[:, None]
            variants = [("lambda", mask, adv), ("advantages", mask, torch.randn(B, generator=g, device=dev)),
                        ("lengths", new_mask, adv)]
            losses = [float(compiled(inp["logits"].detach().clone().requires_grad_(True), mask, adv))]
            frames = len(graphs)
            try:
                with torch._dynamo.config.patch(error_on_recompile=True):
                    for what, m, a in variants:
                        if what == "lambda":
                            with torch.no_grad():
                                loss_fn.lam.fill_(-1.1)
                        x = inp["logits"].detach().clone().requires_grad_(True)
                        out = compiled(x, m, a)
                        out.backward()
                        losses.append(float(out))
                        del x
                ok = len(graphs) == frames and len(set(losses)) == len(losses)
                R.add(S, f"{name}: new lambda / advantages / lengths, no recompile", "PASS" if ok else "FAIL",
                      dtype=dtn, detail=f"graphs {len(graphs)}, losses {[f'{v:.6g}' for v in losses]}", **shp)
            except Exception as e:  # noqa: BLE001
                _fail(R, S, f"{name}: new lambda / advantages / lengths, no recompile", e, dtype=dtn, **shp)
            with torch.no_grad():
                loss_fn.lam.fill_(LAM)
            loss_fn.lam.grad = None
            # (f) peak memory of a step, eager vs compiled
            for how, fn in (("eager", lambda x: step(x, mask, adv)), ("compiled", lambda x: compiled(x, mask, adv))):
                peak = _peak_step(P, fn, inp["logits"])
                loss_fn.lam.grad = None
                R.add(S, f"{name}: peak memory {how}", "OK", dtype=dtn, peak_mem_bytes=peak,
                      peak_x_dlogits=peak / dl_bytes, detail=P.memory, **shp)
        except Exception as e:  # noqa: BLE001
            _fail(R, S, name, e, dtype=dtn, **shp)
        _free(dev)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------
# 4. timing
# ------------------------------------------------------------------------------------------
def trl_logps() -> Tuple[Optional[Callable], str]:
    """TRL's log-prob function and what it is.

    TRL 1.16's selective_log_softmax dispatches CUDA tensors to its Triton kernel
    trl.kernels.selective_log_softmax_and_entropy; trl.trainer.utils imports `datasets`, so where
    that is missing the kernel is imported directly (same computation)."""
    try:
        from trl.trainer.utils import selective_log_softmax

        return (lambda x, t, temperature=1.0: selective_log_softmax(x, t, temperature=temperature),
                "TRL 1.16 selective_log_softmax (trl.trainer.utils) + GRPOTrainer loss (bench/providers.py)")
    except Exception as e1:  # noqa: BLE001
        first = f"{type(e1).__name__}: {e1}"
    try:
        from trl.kernels import selective_log_softmax_and_entropy as kernel

        return (lambda x, t, temperature=1.0: kernel(x, t, temperature=temperature)[0],
                "TRL 1.16 trl.kernels.selective_log_softmax_and_entropy (the kernel selective_log_softmax runs on "
                f"CUDA; trl.trainer.utils not importable: {first[:80]}) + GRPOTrainer loss (bench/providers.py)")
    except Exception as e2:  # noqa: BLE001
        return None, f"trl not importable ({first[:100]}; trl.kernels: {type(e2).__name__}: {str(e2)[:100]})"


@dataclass
class Timed:
    name: str
    label: str
    cfg: str
    make: Callable[[dict, str], object]  # -> bench.providers.Runner
    inplace: bool = False
    peer: bool = False
    skip: Optional[Callable[[dict, str], Optional[str]]] = None
    mem_per_logit: float = 0.0  # expected extra bytes per logit, to skip what cannot fit


def _timed_providers(P: Plan) -> List[Timed]:
    from .providers import Runner, _eager, _has_module, _make_backend, _make_liger_triton, trl_style_loss

    def ours(backend: str, inplace: bool):
        def make(inputs: dict, cfg_name: str):
            logits = inputs["logits"].requires_grad_(True)
            lam = None
            if inputs["lam"] is not None:
                lam = torch.tensor(float(inputs["lam"]), device=logits.device, requires_grad=True)
            kw = {k: inputs[k] for k in ("tokens", "mask", "advantages", "group_size", "old_logp", "ref_logp")}
            cfg = cfg_of(cfg_name)
            leaves = {"logits": logits, **({"lam": lam} if lam is not None else {})}
            return Runner(lambda: lg.grpo_loss(logits, lam=lam, config=cfg, backend=backend,
                                               inplace_backward=inplace, **kw).loss, leaves)
        return make

    def via_case(make_fn):
        def make(inputs: dict, cfg_name: str):
            case = SimpleNamespace(config=lambda: cfg_of(cfg_name), T=inputs["logits"].shape[1])
            return make_fn(case, inputs, P.device)
        return make

    logps, trl_label = trl_logps()

    def make_trl(inputs: dict, cfg_name: str):
        logits = inputs["logits"].requires_grad_(True)
        cfg = cfg_of(cfg_name)
        return Runner(lambda: trl_style_loss(logits, inputs["tokens"], inputs["mask"], inputs["advantages"],
                                             inputs["old_logp"], inputs["ref_logp"], cfg,
                                             selective_log_softmax=logps), {"logits": logits})

    def need_cuda(what: str):
        return lambda inputs, dev: None if dev == "cuda" else f"{what} launches Triton kernels: CUDA only"

    def liger_skip(inputs, dev):
        if not _has_module("liger_kernel"):
            return "liger-kernel not importable (carry the liger_kernel-0.8.5 wheel)"
        return need_cuda("Liger's triton_grpo_loss")(inputs, dev)

    def trl_skip(inputs, dev):
        return None if logps is not None else trl_label

    return [
        Timed("ours_triton_fused", "ours triton, fused (dapo)", "t_dapo", ours("triton", False), mem_per_logit=2),
        Timed("ours_triton_fused_inplace", "ours triton, fused, inplace_backward", "t_dapo", ours("triton", True),
              inplace=True, mem_per_logit=1),
        Timed("ours_triton_2pass", "ours triton, two-pass (lambda_grpo + trace both)", "t_lambda_both",
              ours("triton", False), mem_per_logit=2),
        Timed("ours_triton_2pass_inplace", "ours triton, two-pass, inplace_backward", "t_lambda_both",
              ours("triton", True), inplace=True, mem_per_logit=1),
        Timed("liger_triton", "Liger 0.8.5 triton_grpo_loss (dapo, inplace=False)", "t_dapo",
              via_case(_make_liger_triton), peer=True, skip=liger_skip, mem_per_logit=4),
        Timed("trl", trl_label, "t_dapo", make_trl, peer=True, skip=trl_skip, mem_per_logit=8),
        Timed("eager_fp32", "eager torch, fp32 math (the reference, dtype=float32)", "t_dapo",
              via_case(_eager(torch.float32, False)), mem_per_logit=26),
        Timed("eager_bf16", "eager torch, bf16 math (the reference, dtype=bfloat16)", "t_dapo",
              via_case(_eager(torch.bfloat16, False)), mem_per_logit=14),
        Timed("ours_torch", "ours torch backend (dapo)", "t_dapo", via_case(_make_backend("torch")), mem_per_logit=3),
    ]


def time_one(P: Plan, R: Results, tp: Timed, inputs: dict, pristine: Optional[torch.Tensor], budget: Budget) -> None:
    S = "timing"
    B, T, V = inputs["logits"].shape
    N = B * T
    isz = inputs["logits"].element_size()
    dl_bytes = N * V * isz
    bytes_min = 2 * dl_bytes
    common = dict(provider=tp.name, dtype="bf16" if inputs["logits"].dtype == torch.bfloat16 else "fp32",
                  B=B, T=T, V=V, N=N, bytes_min=bytes_min)
    runner = tp.make(inputs, tp.cfg)
    clock, probe = Clock(P.device), Peak(P.device)
    times, fwd, peaks = [], [], []

    def call(record: bool):
        runner.zero_grad()
        if tp.inplace:
            with torch.no_grad():
                inputs["logits"].copy_(pristine)  # outside the timed region: the last call overwrote them
        probe.start()
        a = clock.mark()
        out = runner.forward()
        b = clock.mark()
        runner.run_backward(out)
        c = clock.mark()
        peak = probe.peak()
        if record:
            fwd.append(clock.between(a, b))
            times.append(clock.between(a, c))
            peaks.append(peak)
        del out

    for _ in range(int(P.reps["warmup"])):
        call(False)
    start = time.monotonic()
    while len(times) < P.reps["reps_max"] and (len(times) < P.reps["reps_min"] or
                                               time.monotonic() - start < P.reps["item_s"]):
        call(True)
        if budget.over() and len(times) >= 1:
            break
    runner.zero_grad()
    med = statistics.median(times)
    gbps = bytes_min / med / GB
    R.timing[(N, V, tp.name)] = med
    R.add(S, tp.label, "OK", median_ms=med * 1e3, min_ms=min(times) * 1e3, max_ms=max(times) * 1e3,
          repeats=len(times), peak_mem_bytes=max(peaks), peak_x_dlogits=max(peaks) / dl_bytes, gbps=gbps,
          frac_copy_bw=gbps * GB / R.copy_bw if R.copy_bw else None,
          detail=f"fwd {statistics.median(fwd) * 1e3:.3f} ms of it; {P.timer}", **common)


def section_timing(P: Plan, R: Results, budget: Budget) -> None:
    S = "timing"
    dev = P.device
    provs = _timed_providers(P)
    R.note(S, "bytes_min = 2 N V itemsize: one read of the logits and one write of dlogits, the least any fwd+bwd "
              "moves (a fused kernel moves about that; the two-pass schedule reads the logits twice, 1.5x); "
              "frac_copy_bw = bytes_min / time / measured copy bandwidth")
    for si, (B, T, V) in enumerate(P.timing):
        N = B * T
        if budget.over():
            R.add(S, f"N={N} V={V}", "SKIP", detail="section time budget spent", B=B, T=T, V=V, N=N)
            continue
        try:
            inputs = make_inputs(B, T, V, torch.bfloat16, dev, seed=500 + si)
        except Exception as e:  # noqa: BLE001
            _fail(R, S, f"inputs N={N} V={V}", e, B=B, T=T, V=V, N=N)
            continue
        pristine = None
        for tp in provs:
            shp = dict(provider=tp.name, dtype="bf16", B=B, T=T, V=V, N=N)
            if budget.over():
                R.add(S, tp.label, "SKIP", detail="section time budget spent", **shp)
                continue
            inputs["lam"] = LAM if cfg_of(tp.cfg).aggregation == "lambda_grpo" else None
            reason = tp.skip(inputs, dev) if tp.skip else None
            if reason is None and dev == "cuda":
                need = tp.mem_per_logit * N * V + (N * V * 2 if tp.inplace else 0)
                free = torch.cuda.mem_get_info()[0]
                if need > 0.85 * free:
                    reason = (f"expected ~{need / GiB:.0f} GiB ({tp.mem_per_logit:g} B per logit) > 85% of the "
                              f"{free / GiB:.0f} GiB free")
            if reason:
                R.add(S, tp.label, "SKIP", detail=reason, **shp)
                continue
            try:
                if tp.inplace and pristine is None:
                    pristine = inputs["logits"].detach().clone()
                time_one(P, R, tp, inputs, pristine, budget)
            except Exception as e:  # noqa: BLE001
                if tp.peer:
                    tb = traceback.format_exc().strip().splitlines()
                    print("\n".join(tb[-8:]), flush=True)
                    R.add(S, tp.label, "ERROR", detail=f"{type(e).__name__}: {str(e)[:300]}", **shp)
                else:
                    _fail(R, S, tp.label, e, **shp)
            finally:
                x = inputs["logits"]
                x.grad = None
                x.requires_grad_(False)
                if pristine is not None:
                    with torch.no_grad():
                        x.copy_(pristine)
                _free(dev)
        inputs = pristine = None
        _free(dev)


# ------------------------------------------------------------------------------------------
# 5. row math: Triton row kernel vs torch ops
# ------------------------------------------------------------------------------------------
def section_rows(P: Plan, R: Results, budget: Budget) -> None:
    S = "rows"
    import lambda_grpo._rowmath as rm
    import lambda_grpo._vocab_triton as vt
    from lambda_grpo._validate import validate

    dev = P.device
    clock = Clock(dev)
    for B, T in P.rows:
        N = B * T
        g = torch.Generator(device=dev)
        g.manual_seed(600 + B)
        V = 8  # the row pass never reads the logits; validate only needs their shape
        logits = torch.zeros((B, T, V), dtype=torch.bfloat16, device=dev)
        tokens = torch.randint(0, V, (B, T), generator=g, device=dev)
        lengths = torch.randint(T // 4, T + 1, (B,), generator=g, device=dev)
        mask = torch.arange(T, device=dev)[None, :] < lengths[:, None]
        logp = -3.0 * torch.rand((B, T), generator=g, device=dev)
        ent = 2.0 + torch.rand((B, T), generator=g, device=dev)
        old = logp + 0.3 * torch.randn((B, T), generator=g, device=dev)
        ref = logp + 0.3 * torch.randn((B, T), generator=g, device=dev)
        adv = torch.randn(B, generator=g, device=dev)
        lam = torch.tensor(LAM, device=dev)
        G = 4 if B % 4 == 0 else B
        for trace in (None, "recent", "both"):
            name = f"row pass B={B} T={T} trace={trace}"
            shp = dict(B=B, T=T, N=N, dtype="fp32")
            if budget.over():
                R.add(S, name, "SKIP", detail="section time budget spent", **shp)
                continue
            try:
                cfg = lg.LossConfig(aggregation="lambda_grpo", trace=trace, trace_mode="ratio", beta=0.04,
                                    entropy_coef=0.01)
                batch = validate(logits, tokens, mask, adv, G, old, ref, lam, cfg, None, None)
                consts = rm.token_constants(batch, cfg, torch.float32)
                fns = {"triton": lambda: vt.row_pass(logp, ent, batch, cfg, consts, want_coef=True),
                       "torch": lambda: rm.row_pass(logp, ent, batch, cfg, consts)}
                med = {}
                for which, fn in fns.items():
                    for _ in range(int(P.reps["warmup"])):
                        fn()
                    ts = []
                    for _ in range(int(P.reps["rows_reps"])):
                        a = clock.mark()
                        fn()
                        ts.append(clock.between(a, clock.mark()))
                    med[which] = statistics.median(ts)
                    vocab = _vocab_step(R, N, max(v for _, _, v in P.timing))
                    R.add(S, f"{name}: {which}", "OK", provider=f"row_pass[{which}]", median_ms=med[which] * 1e3,
                          min_ms=min(ts) * 1e3, max_ms=max(ts) * 1e3, repeats=len(ts),
                          value=f"{med[which] / vocab[0]:.4f}" if vocab else None,
                          unit="x vocab fwd+bwd" if vocab else "",
                          detail=(vocab[1] if vocab else "no vocab timing to compare with") + f"; {P.timer}", **shp)
                a, b = fns["triton"](), fns["torch"]()
                err = float((a.loss - b.loss).abs() / b.loss.abs().clamp(min=1e-12))
                R.add(S, f"{name}: triton/torch time", "INFO", value=f"{med['triton'] / med['torch']:.3f}",
                      unit="ratio", detail=f"loss relative difference {err:.2g}", **shp)
            except Exception as e:  # noqa: BLE001
                _fail(R, S, name, e, **shp)


def _vocab_step(R: Results, N: int, V: int) -> Optional[Tuple[float, str]]:
    """Median fwd+bwd of ours (two-pass, else fused) at V, measured at N or scaled linearly in N."""
    for prov in ("ours_triton_2pass", "ours_triton_fused"):
        got = sorted((n, t) for (n, v, p), t in R.timing.items() if v == V and p == prov)
        if got:
            n0, t0 = next(((n, t) for n, t in got if n == N), got[-1])
            how = "measured" if n0 == N else f"scaled linearly from N={n0}"
            return t0 * N / n0, f"vocab step = {prov} at V={V}, {how}: {t0 * N / n0 * 1e3:.3f} ms"
    return None


# ------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_csv(R: Results) -> str:
    path = os.path.join(R.out, "gpu_check.csv")
    meta = {"run_id": R.meta.get("run_id"), "gpu": R.meta.get("gpu"), "torch": R.meta.get("torch"),
            "cuda": R.meta.get("cuda"), "triton": R.meta.get("triton"), "liger_kernel": R.meta.get("liger_kernel"),
            "trl": R.meta.get("trl"), "timer": R.plan.timer}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in R.rows:
            full = {**meta, **r}
            w.writerow([_fmt(full.get(c)) for c in COLUMNS])
    return path


def write_md(R: Results, wall_s: float) -> str:
    path = os.path.join(R.out, "gpu_check.md")
    m = R.meta
    L = [f"# GPU check {m.get('run_id')}", "",
         f"- machine: {m.get('gpu')}; {m.get('cores')} CPU cores; python {m.get('python')}",
         f"- torch {m.get('torch')} (CUDA {m.get('cuda')}), triton {m.get('triton')}, liger-kernel "
         f"{m.get('liger_kernel')}, trl {m.get('trl')}, transformers {m.get('transformers')}",
         f"- lambda_grpo at git {m.get('git_commit')}; TRITON_INTERPRET={m.get('triton_interpret')}",
         f"- timer: {R.plan.timer}; memory: {R.plan.memory}",
         f"- measured copy bandwidth: {m.get('copy_gbps', '?')} GB/s (read + write)",
         f"- rows: {len(R.rows)}: {R.count('PASS')} PASS, {R.count('FAIL')} FAIL, {R.count('ERROR')} ERROR, "
         f"{R.count('SKIP')} SKIP; wall time {wall_s:.0f} s", ""]
    if R.plan.dry:
        L += ["**Dry run**: CPU, Triton interpreter, tiny sizes. Times and memory say nothing about a GPU.", ""]
    sections = ["device", "correct", "compile", "timing", "rows", "run"]
    for s in sections:
        rows = [r for r in R.rows if r["section"] == s]
        if not rows and s not in R.notes:
            continue
        L += [f"## {s}", ""]
        L += [f"- {n}" for n in R.notes.get(s, [])]
        if R.notes.get(s):
            L.append("")
        if s == "timing":
            L += ["| N | V | provider | status | median ms (min-max, n) | GB/s | % copy BW | peak extra GiB | "
                  "x dlogits | note |", "|---:|---:|---|---|---:|---:|---:|---:|---:|---|"]
            for r in rows:
                if r["status"] == "OK":
                    L.append(f"| {r.get('N')} | {r.get('V')} | {r['name']} | OK | {r['median_ms']:.3f} "
                             f"({r['min_ms']:.3f}-{r['max_ms']:.3f}, {r['repeats']}) | {r['gbps']:.0f} | "
                             f"{_pct(r.get('frac_copy_bw'))} | {r['peak_mem_bytes'] / GiB:.2f} | "
                             f"{r['peak_x_dlogits']:.2f} | |")
                else:
                    L.append(f"| {r.get('N', '')} | {r.get('V', '')} | {r['name']} | {r['status']} | | | | | | "
                             f"{_md(r.get('detail', ''))} |")
        else:
            L += ["| name | provider | status | shape | value | err / allowed | detail |",
                  "|---|---|---|---|---|---|---|"]
            for r in rows:
                shape = f"{r.get('dtype', '')} B={r['B']} T={r['T']} V={r.get('V', '-')}" if r.get("B") else ""
                val = ""
                if r.get("median_ms") is not None:
                    val = f"{r['median_ms']:.3f} ms"
                if r.get("value") is not None:
                    val = (val + " " if val else "") + f"{r['value']} {r.get('unit', '')}".strip()
                if r.get("peak_mem_bytes") is not None:
                    val += f" {r['peak_mem_bytes'] / GiB:.3f} GiB ({r['peak_x_dlogits']:.2f} x dlogits)"
                ea = f"{r['err']:.3g} / {r['allowed']:.3g}" if r.get("err") is not None else ""
                L.append(f"| {r['name']} | {r.get('provider', '')} | {r['status']} | {shape} | {_md(val)} | {ea} | "
                         f"{_md(r.get('detail', ''))} |")
        L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    return path


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def _md(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def write_png(R: Results) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not importable ({e})"
    rows = [r for r in R.rows if r["section"] == "timing" and r["status"] == "OK"]
    shapes = sorted({(r["N"], r["V"]) for r in rows})
    if not shapes:
        return "nothing timed"
    fig, axes = plt.subplots(len(shapes), 2, figsize=(15, 2.2 + 2.0 * len(shapes)), squeeze=False)
    for i, (N, V) in enumerate(shapes):
        sel = [r for r in rows if r["N"] == N and r["V"] == V]
        labels = [r["name"] for r in sel]
        y = list(range(len(sel)))
        med = [r["median_ms"] for r in sel]
        err = [[m - r["min_ms"] for m, r in zip(med, sel)], [r["max_ms"] - m for m, r in zip(med, sel)]]
        colors = ["tab:blue" if r["provider"].startswith("ours") else "tab:gray" for r in sel]
        ax = axes[i][0]
        ax.barh(y, med, xerr=err, color=colors, capsize=3)
        ax.set_yticks(y)
        ax.set_yticklabels([lb[:60] for lb in labels], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("fwd+bwd ms (median; bars min-max)")
        ax.set_title(f"N={N}, V={V}, bf16", fontsize=9)
        for yy, r in zip(y, sel):
            if r.get("frac_copy_bw") is not None:
                ax.text(r["median_ms"], yy, f"  {100 * r['frac_copy_bw']:.0f}% copy BW", va="center", fontsize=7)
        ax2 = axes[i][1]
        ax2.barh(y, [r["peak_x_dlogits"] for r in sel], color=colors)
        ax2.set_yticks(y)
        ax2.set_yticklabels([])
        ax2.invert_yaxis()
        ax2.axvline(1.0, color="k", ls="--", lw=1)
        ax2.set_xlabel("peak extra memory, x one dlogits buffer")
    fig.suptitle(f"lambda-grpo GPU check {R.meta.get('run_id')}: {R.meta.get('gpu')}\n"
                 f"timer: {R.plan.timer}; copy bandwidth {R.meta.get('copy_gbps', '?')} GB/s", fontsize=9)
    fig.tight_layout()
    path = os.path.join(R.out, "gpu_check.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def summary_table(R: Results) -> str:
    out = [f"{'section':<8} {'status':<6} item"]
    for r in R.rows:
        s = r["section"]
        if s == "device" and r["status"] == "INFO":
            continue
        if s in ("correct", "compile") and r["status"] == "PASS" and not r["name"].startswith("pytest"):
            continue  # counted below; every row is in gpu_check.md
        if s == "rows" and r["status"] == "OK":
            continue  # the ratio rows carry the comparison
        item = r["name"] + (f" [{r['provider']}]" if r.get("provider") else "")
        if r.get("B"):
            item += f" N={r['N']} V={r.get('V', '-')}"
        if r.get("median_ms") is not None:
            item += f": {r['median_ms']:.3f} ms"
            if r.get("frac_copy_bw") is not None:
                item += f", {100 * r['frac_copy_bw']:.0f}% copy BW"
            if r.get("peak_x_dlogits") is not None:
                item += f", mem {r['peak_x_dlogits']:.2f}x dlogits"
        elif r.get("value") is not None:
            item += f": {r['value']} {r.get('unit', '')}".rstrip()
        if r["status"] in ("FAIL", "ERROR", "SKIP") and r.get("detail"):
            item += f" -- {str(r['detail'])[:140]}"
        out.append(f"{s:<8} {r['status']:<6} {item}")
    for sec in ("correct", "compile"):
        n_pass = sum(r["status"] == "PASS" and r["section"] == sec for r in R.rows)
        out.append(f"{sec:<8} {'PASS':<6} {n_pass} {sec} checks passed (each one is in gpu_check.md)")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------
def _meta(P: Plan, run_id: str) -> Dict[str, str]:
    return {
        "run_id": run_id, "gpu": torch.cuda.get_device_name(0) if P.device == "cuda" else "none (dry run, CPU)",
        "python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
        "triton": _version("triton"), "liger_kernel": _liger_version(), "trl": _version_dist("trl"),
        "transformers": _version("transformers"), "git_commit": _git("rev-parse", "--short", "HEAD") or "?",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"), "cores": str(os.cpu_count()),
        "loadavg_start": _loadavg(),
    }


def _version_dist(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "not installed"


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output folder (default bench/results/gpu-<utc time>[-dry])")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, TRITON_INTERPRET=1, tiny sizes: the same code path, for the test suite")
    ap.add_argument("--sections", default="device,correct,compile,timing,rows",
                    help="comma-separated subset of device,correct,compile,timing,rows")
    args = ap.parse_args(argv)
    t_start = time.monotonic()

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        os.environ["LG_TEST_DEVICE"] = "cpu"
    else:
        os.environ["LG_TEST_DEVICE"] = "cuda"
    import tests.conftest  # noqa: F401  the interpreter fixes of the test suite (dry run)

    if not args.dry_run and not torch.cuda.is_available():
        print("bench.gpu_check: CUDA is not available. This check needs an NVIDIA GPU; use --dry-run to run "
              "the same code path on the CPU under the Triton interpreter.", file=sys.stderr)
        return 2
    P = dry_plan() if args.dry_run else gpu_plan()
    faulthandler.dump_traceback_later(P.hard_limit_s, exit=True)  # a hung kernel must not eat the device time
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_id = f"gpu-{stamp}" + ("-dry" if P.dry else "")
    out = args.out or os.path.join(REPO, "bench", "results", run_id)
    os.makedirs(out, exist_ok=True)
    R = Results(P, out, _meta(P, run_id))
    print(f"bench.gpu_check {run_id} -> {out}\n  {R.meta['gpu']}; torch {R.meta['torch']} (CUDA {R.meta['cuda']}), "
          f"triton {R.meta['triton']}; timer: {P.timer}", flush=True)
    wanted = set(args.sections.split(","))
    sections = [("device", section_device), ("correct", section_correct), ("compile", section_compile),
                ("timing", section_timing), ("rows", section_rows)]
    pytest_handle = None
    pytest_deadline = None
    for name, fn in sections:
        if name not in wanted:
            continue
        if name == "timing" and pytest_handle is not None:
            finish_pytest(P, R, pytest_handle, pytest_deadline - time.monotonic())
            pytest_handle = None
        budget = Budget(P.budgets[name])
        t0 = time.monotonic()
        print(f"\n=== {name} (budget {budget.seconds:.0f} s) ===", flush=True)
        try:
            if name == "correct":
                try:
                    pytest_handle = start_pytest(P, R)
                    pytest_deadline = time.monotonic() + P.budgets["pytest"]
                except Exception as e:  # noqa: BLE001
                    _fail(R, "correct", "pytest (start)", e)
            if name in ("timing", "rows") and R.copy_bw is None and P.device == "cuda":
                R.copy_bw = measure_copy(P)[0]
            fn(P, R, budget)
        except Exception as e:  # noqa: BLE001
            _fail(R, name, f"section {name}", e)
        R.add("run", f"section {name}", "INFO", value=f"{time.monotonic() - t0:.1f}", unit="s",
              detail=f"budget {budget.seconds:.0f} s")
        _free(P.device)
        write_csv(R)
        write_md(R, time.monotonic() - t_start)
    if pytest_handle is not None:
        finish_pytest(P, R, pytest_handle, pytest_deadline - time.monotonic())
    wall = time.monotonic() - t_start
    R.add("run", "total wall time", "INFO", value=f"{wall:.1f}", unit="s")
    csv_path, md_path = write_csv(R), write_md(R, wall)
    try:
        why = write_png(R)
    except Exception as e:  # noqa: BLE001
        why = f"{type(e).__name__}: {e}"
    faulthandler.cancel_dump_traceback_later()
    print("\n" + summary_table(R))
    plot = f"; no plot: {why}" if why else f", {os.path.join(out, 'gpu_check.png')}"
    print(f"\nwrote {csv_path}, {md_path}" + plot)
    fails = R.count("FAIL")
    print(f"{R.count('PASS')} passed, {fails} failed, {R.count('ERROR')} peer errors, {R.count('SKIP')} skipped; "
          f"total wall time {wall:.0f} s")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
