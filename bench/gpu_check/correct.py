"""Section 2, correct: the compiled kernels against the float64 reference, on the card.

- the grid of run 1: backend="triton" and backend="torch" vs the float64 reference, bf16 and fp32
  logits, V in {32 000, 151 936}, configs dapo_fused (fused schedule, KL, entropy, tau = 0.9),
  lambda_both_ratio (two-pass, lambda-GRPO, "both" ratio trace, adv clamp), lambda_recent_weight;
- every surrogate (cispo, cispo_two_sided, sapo, vespo; clip is dapo_fused) and GSPO
  (importance_sampling="sequence"), backend="triton";
- packed inputs (cu_seqlens), backend="triton", against the float64 truth of the same batch padded;
- long rows: one row of 65 536 tokens (Liger-Kernel's (B, L) grid stops at 65 535), fused and
  GSPO against the float64 reference; with a ratio trace against our torch engine in float64 (the
  reference's (n, n) trace matrix would need 34 GB at n = 65 536);
- at N = 16 384, V = 151 936 (no float64 truth fits) triton against the torch backend;
- in parallel, in a subprocess: pytest tests/test_triton.py tests/test_triton_int64.py natively
  on CUDA (LG_TEST_DEVICE=cuda); waited for before anything is timed.

The rule is the project's (tests/_compare.py): element by element, the error against the float64
truth at most 2x that of plain torch (the reference with fp32 math on the same inputs) plus small
atol/rtol; clip fractions may differ only by tokens within roundoff of a clip boundary. **Scalars**
(the loss, dlambda, every metric) take as plain torch's error the worst of plain torch on the
inputs and on `scalar_moves` one-ulp moves of them (logits, old and ref log-probs): one draw of a
single number can land lucky (run 1's two misses: plain torch's loss error 1.4e-6 on one seed,
ours 4.1e-6 and 4.8e-6; the element-wise rule cannot help a scalar). The detail of each scalar row
says what the one-draw rule would have said.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

import lambda_grpo as lg

from .common import (DTYPES, LAM, REPO, Budget, Plan, Results, cfg_of, dtn_of, fail, free, make_inputs, shape_of,
                     skip_spent, ulp_moved)

S = "correct"
SCALARS = ("loss", "dlam")


# ------------------------------------------------------------------------------------------
# the rule
# ------------------------------------------------------------------------------------------
def _index(flat: int, shape) -> tuple:
    idx = []
    for s in reversed(shape):
        idx.append(flat % s)
        flat //= s
    return tuple(reversed(idx))


def judge(name: str, got: torch.Tensor, truth: torch.Tensor, base: torch.Tensor, dtype,
          compute: Optional[torch.Tensor] = None) -> Tuple[bool, float, float, str]:
    """tests/_compare.py's verdict; err/allowed at the element closest to (or furthest past) its
    budget, and that element's three values."""
    from tests._compare import abs_err, allowed_err, assert_close_to_truth

    if got.shape != truth.shape:
        return False, math.inf, 0.0, f"shape {tuple(got.shape)} vs truth {tuple(truth.shape)}"
    if truth.numel() == 0:
        return True, 0.0, 0.0, "empty"
    # the budget and the verdict exactly as assert_close_to_truth forms them (computed once: a
    # float64 budget of a (6144, 151 936) gradient is 7.5 GB); its message only on a failure
    e = abs_err(got, truth)
    a = allowed_err(truth, base, dtype, compute=compute)
    ok, msg = not bool((~(e <= a)).any()), ""
    if not ok:
        try:
            assert_close_to_truth(name, got, truth, base, dtype, compute=compute)
            ok = True  # the rule's owner decides
            msg = "assert_close_to_truth passed where allowed_err said no (tests/_compare.py changed?)"
        except AssertionError as err:
            msg = str(err)
    ratio = torch.where(a > 0, e / a, torch.where(e > 0, math.inf, 0.0))
    flat = int(torch.argmax(ratio.reshape(-1).nan_to_num(nan=math.inf)))
    err, allowed = float(e.reshape(-1)[flat]), float(a.reshape(-1)[flat])
    del e, a, ratio
    vals = [float(x.reshape(-1)[flat]) for x in (got, truth, base)]
    where = "" if truth.dim() == 0 else f"worst at {_index(flat, truth.shape)}: "
    detail = f"{where}got {vals[0]:.9g}, truth {vals[1]:.9g}, plain torch {vals[2]:.9g}"
    return ok, err, allowed, detail + (f"; {msg[:300]}" if msg else "")


def _farthest(values: List[torch.Tensor], truth: torch.Tensor) -> torch.Tensor:
    from tests._compare import max_err

    return max(values, key=lambda v: max_err(v, truth))


def truth_and_base(inp: dict, cfg_name: str, lam: float, moves: int, truth_backend: str = "reference",
                   base_backend: str = "reference") -> Tuple[dict, dict, dict]:
    """(truth, base, scalar_base): the float64 truth, plain torch (fp32 math) on the same inputs,
    and for the scalars the farthest of plain torch on the inputs and on `moves` one-ulp moves."""
    from tests._compare import run

    cfg = cfg_of(cfg_name)
    if truth_backend == "reference":
        truth = run("reference", inp, cfg, lam, dtype=torch.float64)
    else:  # an engine on float64 copies of the same values
        truth = run(truth_backend, dict(inp, logits=inp["logits"].double()), cfg, lam)
    base = run("reference", inp, cfg, lam, dtype=torch.float32) if base_backend == "reference" else \
        run(base_backend, inp, cfg, lam)

    def moved_bases():
        for s in range(moves):
            moved = ulp_moved(inp, s, keys=("logits", "old_logp", "ref_logp"))
            yield run("reference", moved, cfg, lam, dtype=torch.float32) if base_backend == "reference" else \
                run(base_backend, moved, cfg, lam)

    return truth, base, scalar_baselines(truth, base, moved_bases())


def scalar_baselines(truth: dict, base: dict, moved) -> dict:
    """The scalar rule's baseline of each scalar (SCALARS and every metric, "m:<name>"): plain
    torch's result farthest from the truth over the inputs (`base`) and their one-ulp moves
    (`moved`, an iterable of results, consumed one at a time)."""
    scal: Dict[str, list] = {}
    for r in itertools.chain([base], moved):
        for q in SCALARS:
            if r[q] is not None:
                scal.setdefault(q, []).append(r[q])
        for k, v in r["metrics"].items():
            scal.setdefault(f"m:{k}", []).append(v)
    tr = {**{q: truth[q] for q in SCALARS}, **{f"m:{k}": v for k, v in truth["metrics"].items()}}
    return {k: _farthest(v, tr[k]) for k, v in scal.items()}


def judge_result(R: Results, name: str, got: dict, truth: dict, base: dict, scalar_base: dict, inp: dict,
                 cfg_name: str, provider: str, shp: dict, moves: int, dlogits_view=None) -> None:
    """Rows for loss, dlogits, dlam and the metrics of one result against the truth.
    dlogits_view: maps the truth's / plain torch's dlogits to the layout of got's (packed inputs)."""

    dtype = inp["logits"].dtype
    dtn = dtn_of(dtype)
    view = dlogits_view or (lambda t: t)
    n_valid = int(inp["mask"].sum())
    common = dict(provider=provider, dtype=dtn, n_valid=n_valid, **shp)
    for q in ("loss", "dlogits", "dlam"):
        if truth[q] is None:
            continue
        if q == "dlogits":
            comp = base.get("dlogits_compute")
            ok, err, allowed, detail = judge(q, got[q], view(truth[q]), view(base[q]), dtype,
                                             compute=None if comp is None else view(comp))
        else:
            ok, err, allowed, detail = judge(q, got[q], truth[q], scalar_base[q], dtype)
            detail += "; " + _one_draw(q, got[q], truth[q], base[q], dtype, moves)
        R.add(S, f"{name}: {q}", "PASS" if ok else "FAIL", err=err, allowed=allowed, detail=detail, **common)
    add_metrics_row(R, name, got, truth, base, scalar_base, inp, cfg_of(cfg_name), dtype, common)


def add_metrics_row(R: Results, name: str, got: dict, truth: dict, base: dict, scalar_base: dict, inp: dict, cfg,
                    rule, row: dict) -> None:
    """One row for a result's metrics: the clip fractions by tests/_compare.py's boundary rule,
    the others as scalars against `scalar_base` (scalar_baselines), judged in `rule`'s dtype."""
    from tests._compare import assert_clip_fractions_match

    bad, worst = [], (0.0, "", 0.0, 0.0)
    if set(got["metrics"]) != set(truth["metrics"]):
        bad.append(f"keys {sorted(got['metrics'])} != {sorted(truth['metrics'])}")
    try:
        if "ratio" in truth and "ratio" in base:
            assert_clip_fractions_match(got["metrics"], truth, base, inp, cfg)
    except AssertionError as e:
        bad.append(str(e)[:200])
    for k, t in truth["metrics"].items():
        if k.startswith("clip_frac") or k not in got["metrics"]:
            continue
        ok, err, allowed, _ = judge(k, got["metrics"][k], t, scalar_base[f"m:{k}"], rule)
        if not ok:
            bad.append(f"{k}: err {err:.3g} > {allowed:.3g}")
        ratio = err / allowed if allowed > 0 else (math.inf if err > 0 else 0.0)
        if ratio >= worst[0]:
            worst = (ratio, k, err, allowed)
    R.add(S, f"{name}: metrics", "PASS" if not bad else "FAIL", err=worst[2], allowed=worst[3],
          detail="; ".join(([f"worst: {worst[1]}"] if worst[1] else []) + bad), **row)


def _one_draw(q: str, got, truth, base, dtype, moves: int) -> str:
    """What run 1's rule (plain torch on the inputs alone) would have said of a scalar."""
    from tests._compare import FACTOR, ATOL, RTOL, max_err

    allowed = FACTOR * max_err(base, truth) + ATOL[dtype] + RTOL[dtype] * float(truth.double().abs())
    verdict = "PASS" if max_err(got, truth) <= allowed else "FAIL"
    return f"scalar baseline: worst of plain torch over the inputs + {moves} one-ulp moves; one draw: {verdict} " \
           f"(allowed {allowed:.3g})"


# ------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------
def check_backends(P: Plan, R: Results, inp: dict, cfg_name: str, lam: float, backends=("triton", "torch"),
                   tag: str = "", truth_backend: str = "reference", base_backend: str = "reference") -> None:
    from tests._compare import run

    shp = shape_of(inp)
    truth, base, scalar_base = truth_and_base(inp, cfg_name, lam, P.scalar_moves, truth_backend, base_backend)
    for backend in backends:
        name = f"{tag}{cfg_name} vs float64" + ("" if truth_backend == "reference" else f" ({truth_backend} engine)")
        try:
            got = run(backend, inp, cfg_of(cfg_name), lam)
        except Exception as e:  # noqa: BLE001
            fail(R, S, name, e, provider=backend, dtype=dtn_of(inp["logits"].dtype), **shp)
            continue
        judge_result(R, name, got, truth, base, scalar_base, inp, cfg_name, backend, shp, P.scalar_moves)
        del got
    del truth, base, scalar_base


def pack(inp: dict) -> Tuple[dict, torch.Tensor, torch.Tensor]:
    """The padded batch as packed (varlen) inputs: segment i = row i's first L_i positions, L_i =
    its last valid position + 1. Returns (packed grpo_loss kwargs, cu_seqlens, flat positions)."""
    mask = inp["mask"]
    B, T = mask.shape
    ar = torch.arange(1, T + 1, device=mask.device)
    lengths = (mask * ar).amax(dim=1)  # last valid position + 1 (0 for an empty row)
    keep = ar[None, :] <= lengths[:, None]
    pos = keep.reshape(-1).nonzero().squeeze(1)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    V = inp["logits"].shape[-1]
    flat = {k: inp[k].reshape(-1, V) if k == "logits" else inp[k].reshape(-1) for k in
            ("logits", "tokens", "mask", "old_logp", "ref_logp")}
    packed = {k: v.index_select(0, pos) for k, v in flat.items()}
    packed.update(advantages=inp["advantages"], group_size=inp["group_size"])
    return packed, cu, pos


def run_packed(backend: str, packed: dict, cu: torch.Tensor, cfg_name: str, lam: float) -> dict:
    """Loss, metrics, dlogits (N, V) and dlam of the public API on packed inputs."""
    cfg = cfg_of(cfg_name)
    x = packed["logits"].detach().clone().requires_grad_(True)
    lam_t = torch.tensor(float(lam), dtype=torch.float32, requires_grad=True) if cfg.uses_lambda else None
    kw = {k: v for k, v in packed.items() if k != "logits"}
    out = lg.grpo_loss(x, lam=lam_t, config=cfg, backend=backend, cu_seqlens=cu, **kw)
    out.loss.backward()
    return dict(loss=out.loss.detach(), metrics={k: v.detach() for k, v in out.metrics.items()}, dlogits=x.grad,
                dlam=None if lam_t is None else lam_t.grad)


def check_packed(P: Plan, R: Results, inp: dict, cfg_name: str, lam: float) -> None:
    shp = shape_of(inp)
    packed, cu, pos = pack(inp)
    V = inp["logits"].shape[-1]
    truth, base, scalar_base = truth_and_base(inp, cfg_name, lam, P.scalar_moves)
    name = (f"packed (cu_seqlens, {cu.numel() - 1} segments, {pos.numel()} tokens) {cfg_name} vs float64 of "
            "the padded batch")
    try:
        got = run_packed("triton", packed, cu, cfg_name, lam)
    except Exception as e:  # noqa: BLE001
        fail(R, S, name, e, provider="triton", dtype=dtn_of(inp["logits"].dtype), **shp)
        return
    judge_result(R, name, got, truth, base, scalar_base, inp, cfg_name, "triton", shp, P.scalar_moves,
                 dlogits_view=lambda t: t.reshape(-1, V).index_select(0, pos))


def check_agreement(R: Results, inp: dict, cfg_name: str, lam: float) -> None:
    """No float64 truth at this size: triton against the torch backend, both fp32 math."""
    from tests._compare import max_err, run

    cfg = cfg_of(cfg_name)
    dtype = inp["logits"].dtype
    dtn = dtn_of(dtype)
    shp = shape_of(inp)
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
              allowed=allowed, **shp)
    errs = {k: max_err(a["metrics"][k], b["metrics"][k]) / max(float(b["metrics"][k].double().abs().max()), 1e-6)
            for k in b["metrics"] if not k.startswith("clip_frac")}
    n = max(1, int(inp["mask"].sum()))
    clip = {k: max_err(a["metrics"][k], b["metrics"][k]) for k in b["metrics"] if k.startswith("clip_frac")}
    bad = [k for k, v in errs.items() if v > 1e-4] + [k for k, v in clip.items() if v > 4.0 / n]
    worst = max(errs, key=errs.get)
    R.add(S, f"{name}: metrics", "PASS" if not bad else "FAIL", provider="triton", dtype=dtn, err=errs[worst],
          allowed=1e-4, detail=f"worst relative: {worst}" + (f"; off: {bad}" if bad else ""), **shp)


# ------------------------------------------------------------------------------------------
# the Triton test files in a subprocess
# ------------------------------------------------------------------------------------------
def start_pytest(P: Plan, R: Results):
    """The Triton test files in a subprocess (natively on CUDA: LG_TEST_DEVICE=cuda, no interpreter)."""
    env = dict(os.environ)
    env["LG_TEST_DEVICE"] = P.device
    if P.device == "cuda":
        env.pop("TRITON_INTERPRET", None)
    path = os.path.join(R.out, "pytest.log")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *P.pytest_args]
    R.note(S, f"started `{' '.join(cmd[1:])}` with LG_TEST_DEVICE={P.device}"
              f"{'' if P.device == 'cuda' else ' (interpreter)'}; full output in pytest.log")
    with open(path, "w") as log:
        # its own session: a timeout ends the whole group (test_triton_int64 starts a child python)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, path, time.monotonic()


def finish_pytest(P: Plan, R: Results, handle, timeout: float) -> None:
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
        lines = f.read().strip().splitlines()
    print("----- pytest output (tail; all of it in pytest.log) -----\n" + "\n".join(lines[-40:]) +
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


# ------------------------------------------------------------------------------------------
# the section
# ------------------------------------------------------------------------------------------
def _guarded(R: Results, budget: Budget, dev: str, label: str, shape: Tuple[int, int, int, str], fn, seed: int,
             full_first: bool = False) -> None:
    B, T, V, dtn = shape
    shp = dict(B=B, T=T, V=V, N=B * T, dtype=dtn)
    if budget.over():
        skip_spent(R, S, label, **shp)
        return
    inp = None
    try:
        inp = make_inputs(B, T, V, DTYPES[dtn], dev, seed=seed, full_first=full_first)
        fn(inp)
    except Exception as e:  # noqa: BLE001
        fail(R, S, label, e, **shp)
    del inp
    free(dev)


def run(P: Plan, R: Results, budget: Budget) -> None:
    dev = P.device
    R.note(S, f"scalars (loss, dlambda, metrics): plain torch's error is its worst over the inputs and "
              f"{P.scalar_moves} one-ulp moves of them (logits, old and ref log-probs); tensors: element by "
              "element on the inputs as they are (tests/_compare.py)")
    for i, (B, T, V, dtn, c) in enumerate(P.correct):
        _guarded(R, budget, dev, f"{c} V={V} {dtn}", (B, T, V, dtn),
                 lambda inp, c=c: check_backends(P, R, inp, c, LAM), seed=100 + i)
    for i, (B, T, V, dtn, c) in enumerate(P.variants):
        _guarded(R, budget, dev, f"{c} V={V} {dtn}", (B, T, V, dtn),
                 lambda inp, c=c: check_backends(P, R, inp, c, LAM, backends=("triton",)), seed=150 + i)
    for i, (B, T, V, dtn, c) in enumerate(P.packed):
        _guarded(R, budget, dev, f"packed {c} V={V} {dtn}", (B, T, V, dtn),
                 lambda inp, c=c: check_packed(P, R, inp, c, LAM), seed=170 + i, full_first=True)
    for i, (B, T, V, dtn, c) in enumerate(P.long_rows):
        _guarded(R, budget, dev, f"long row T={T} {c}", (B, T, V, dtn),
                 lambda inp, c=c, T=T: check_backends(P, R, inp, c, LAM, backends=("triton",),
                                                      tag=f"long row T={T}: "), seed=200 + i, full_first=True)
    if P.long_trace is not None:
        B, T, V, dtn, c = P.long_trace
        R.note(S, f"long row with a ratio trace (T = {T}): the truth is our torch engine on float64 copies of the "
                  "inputs (O(T) float64 scans), the yardstick the torch engine on the inputs as they are: the "
                  "reference builds an (n, n) trace matrix per row (34 GB in float64 at n = 65 536)")
        _guarded(R, budget, dev, f"long row T={T} {c}", (B, T, V, dtn),
                 lambda inp: check_backends(P, R, inp, c, LAM, backends=("triton",), tag=f"long row T={T}: ",
                                            truth_backend="torch", base_backend="torch"),
                 seed=210, full_first=True)
    B, T, V, dtn, cfgs = P.agree
    for j, c in enumerate(cfgs):
        _guarded(R, budget, dev, f"agreement {c} N={B * T}", (B, T, V, dtn),
                 lambda inp, c=c: check_agreement(R, inp, c, LAM), seed=300 + j)


def summary(R: Results) -> Dict[str, int]:
    rows = [r for r in R.rows if r["section"] == S]
    return {k: sum(r["status"] == k for r in rows) for k in ("PASS", "FAIL", "SKIP")}
