"""Section 5, timing (issue 20 target 1): fwd+bwd of one training step, bf16, logits route.

Grid: N in {2048, 16 384, 65 536} x V in {32 000, 151 936} (a provider whose expected memory
exceeds 85% of the free memory is skipped with the estimate). Providers, all on the same inputs
(DAPO token mean, eps 0.2/0.28, k3 KL beta 0.04, unless noted), a fresh gradient every call:
ours backend="triton" fused (dapo) and two-pass (lambda_grpo + "both" ratio trace), each with
and without inplace_backward=True (in place: the logits are redrawn from their seed before each
call, outside the timed region); Liger-Kernel's triton_grpo_loss; TRL 1.16's
selective_log_softmax (its Triton kernel on CUDA) + GRPOTrainer's loss (bench/providers.py);
eager torch (the reference with fp32 and with bf16 math); ours backend="torch" at small N only.

Each: warm-up calls, then repeats until reps_max, or item_s once reps_min are done; CUDA events
around forward + backward; median, min, max; peak memory above the baseline.

Bandwidth: bytes_model = the provider's kernels' vocabulary-sized bytes under the byte MODEL of
bench/gpu_model.py (SCHEDULES: a valid row read twice and its gradient written once, a masked
row's gradient written once; checked here against the kernels by counting their loads and stores
under the Triton interpreter); gbps = bytes_model / time; frac_copy_bw = that / the measured copy
bandwidth. bytes_floor = each valid row read once + every gradient row written once (the least
any fwd+bwd moves); frac_floor = bytes_floor / time / copy bandwidth. (Run 1 of 2026-11-30 used
2 N V itemsize, i.e. every row read once, for its "%".)

In place vs out of place: one step of each of ours is profiled at `profile_shape` (the device
time per kernel); the report compares the step times and says where a difference comes from
(kernel time or time outside the kernels).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, List, Optional, Tuple

import torch

import lambda_grpo as lg

from .. import gpu_model
from ..cases import LOGIT_SCALE
from .common import (GB, LAM, REPO, Budget, Peak, Plan, Results, cfg_of, cuda_clock, fail, fill_normal_, free,
                     make_inputs, skip_spent, too_big)

S = "timing"


# ------------------------------------------------------------------------------------------
# providers
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


def triton_runs_here(device: str) -> bool:
    """CUDA, or the Triton interpreter (the dry run): where a peer's Triton kernels can run."""
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class Timed:
    name: str
    label: str
    cfg: str
    make: Callable[[dict, str], object]  # -> bench.providers.Runner
    model: Optional[str] = None  # key of gpu_model.SCHEDULES
    inplace: bool = False
    peer: bool = False
    skip: Optional[Callable[[dict, str], Optional[str]]] = None
    mem_per_logit: float = 0.0  # expected extra bytes per logit, to skip what cannot fit


def timed_providers(P: Plan) -> List[Timed]:
    from ..providers import Runner, _eager, _has_module, _make_backend, _make_liger_triton, trl_style_loss

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

    def liger_skip(inputs, dev):
        if not _has_module("liger_kernel"):
            return "liger-kernel not importable (carry the liger_kernel-0.8.5 wheel)"
        if not triton_runs_here(dev):
            return "Liger's triton_grpo_loss launches Triton kernels: CUDA (or the interpreter) only"
        return None

    def trl_skip(inputs, dev):
        return None if logps is not None else trl_label

    def torch_engine_skip(inputs, dev):
        N = inputs["logits"].shape[0] * inputs["logits"].shape[1]
        if N > P.torch_engine_max_n:
            return (f"timed at N <= {P.torch_engine_max_n} only: the torch engine is a CPU design (thousands of "
                    "small launches on a GPU, 78 ms - 2.6 s per step in run 1); keeps the run under 8 minutes")
        return None

    return [
        Timed("ours_triton_fused", "ours triton, fused (dapo)", "t_dapo", ours("triton", False), "fused",
              mem_per_logit=2),
        Timed("ours_triton_fused_inplace", "ours triton, fused, inplace_backward", "t_dapo", ours("triton", True),
              "fused", inplace=True, mem_per_logit=1),
        Timed("ours_triton_2pass", "ours triton, two-pass (lambda_grpo + trace both)", "t_lambda_both",
              ours("triton", False), "two-pass", mem_per_logit=2),
        Timed("ours_triton_2pass_inplace", "ours triton, two-pass, inplace_backward", "t_lambda_both",
              ours("triton", True), "two-pass", inplace=True, mem_per_logit=1),
        Timed("liger_triton", "Liger 0.8.5 triton_grpo_loss (dapo, inplace=False)", "t_dapo",
              via_case(_make_liger_triton), "liger", peer=True, skip=liger_skip, mem_per_logit=4),
        Timed("trl", trl_label, "t_dapo", make_trl, "trl", peer=True, skip=trl_skip, mem_per_logit=8),
        Timed("eager_fp32", "eager torch, fp32 math (the reference, dtype=float32)", "t_dapo",
              via_case(_eager(torch.float32, False)), mem_per_logit=26),
        Timed("eager_bf16", "eager torch, bf16 math (the reference, dtype=bfloat16)", "t_dapo",
              via_case(_eager(torch.bfloat16, False)), mem_per_logit=14),
        Timed("ours_torch", "ours torch backend (dapo)", "t_dapo", via_case(_make_backend("torch")),
              skip=torch_engine_skip, mem_per_logit=3),
    ]


# ------------------------------------------------------------------------------------------
# one measurement
# ------------------------------------------------------------------------------------------
def time_one(P: Plan, R: Results, tp: Timed, inputs: dict, restore: Callable[[], None], budget: Budget) -> None:
    B, T, V = inputs["logits"].shape
    N = B * T
    isz = inputs["logits"].element_size()
    dl_bytes = N * V * isz
    n_valid = int(inputs["mask"].sum())
    floor = gpu_model.traffic_bytes(gpu_model.FLOOR, n_valid, N, V, isz)
    model = gpu_model.traffic_bytes(gpu_model.SCHEDULES[tp.model], n_valid, N, V, isz) if tp.model else None
    common = dict(provider=tp.name, dtype="bf16" if inputs["logits"].dtype == torch.bfloat16 else "fp32",
                  B=B, T=T, V=V, N=N, n_valid=n_valid, bytes_model=model, bytes_floor=floor)
    runner = tp.make(inputs, tp.cfg)
    clock, probe = cuda_clock(P.device), Peak(P.device)
    times, fwd, peaks = [], [], []

    def call(record: bool):
        runner.zero_grad()
        if tp.inplace:
            restore()  # outside the timed region: the last call wrote its gradient over the logits
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
    R.timing[(N, V, tp.name)] = med
    bw = R.copy_bw
    R.add(S, tp.label, "OK", median_ms=med * 1e3, min_ms=min(times) * 1e3, max_ms=max(times) * 1e3,
          repeats=len(times), peak_mem_bytes=max(peaks), peak_x_dlogits=max(peaks) / dl_bytes,
          gbps=None if model is None else model / med / GB,
          frac_copy_bw=None if model is None or not bw else model / med / bw,
          frac_floor=floor / med / bw if bw else None,
          detail=f"fwd {statistics.median(fwd) * 1e3:.3f} ms of it; {P.timer}", **common)


# ------------------------------------------------------------------------------------------
# the byte model, checked against the kernels
# ------------------------------------------------------------------------------------------
def start_traffic(P: Plan, R: Results):
    """On a GPU run: count the kernels' traffic under the interpreter in a CPU subprocess, in
    parallel with the other sections (the dry run counts in-process)."""
    if P.dry:
        return None
    path = os.path.join(R.out, "traffic.json")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    log = open(os.path.join(R.out, "traffic.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "bench.gpu_model", "--traffic", path], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, path, log


def check_model(P: Plan, R: Results, handle, timeout: float) -> None:
    name = "byte model vs the kernels (interpreter count)"
    try:
        if handle is None:  # dry run: this process already runs the kernels in the interpreter
            measured = gpu_model.measure_traffic()
            verdicts = gpu_model.check_traffic(measured)
        else:
            proc, path, log = handle
            try:
                proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            if not os.path.exists(path):
                R.add(S, name, "FAIL", detail=f"bench.gpu_model --traffic wrote nothing (exit {proc.returncode}); "
                                              "see traffic.log")
                return
            with open(path) as f:
                got = json.load(f)
            if "error" in got:
                R.add(S, name, "SKIP", detail=f"the Triton interpreter here cannot run the kernels ({got['error']}); "
                                              "the model is checked by the dry run (tests/test_gpu_check.py)")
                return
            verdicts = got["verdicts"]
    except Exception as e:  # noqa: BLE001
        fail(R, S, name, e)
        return
    for v in verdicts:
        status = "SKIP" if v["ok"] is None else "PASS" if v["ok"] else "FAIL"
        R.add(S, f"{name}: {v['schedule']}", status, detail=v["detail"])
    for k, m in gpu_model.SCHEDULES.items():
        R.note(S, f"byte model '{k}': valid row read {m['reads_valid']}x + gradient written {m['writes_valid']}x, "
                  f"masked row read {m['reads_masked']}x + written {m['writes_masked']}x ({m['source']})")


# ------------------------------------------------------------------------------------------
# in place vs out of place: where the time goes
# ------------------------------------------------------------------------------------------
def kernel_times(prof, cuda: bool) -> List[Tuple[str, float, int]]:
    """(name, total microseconds, calls) per device kernel (CUDA), or per top-level op (CPU)."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.key_averages():
        if cuda:
            if getattr(e, "device_type", None) != DeviceType.CUDA:
                continue
            us = getattr(e, "device_time_total", None)
            if us is None:
                us = getattr(e, "cuda_time_total", 0.0)
        else:
            us = getattr(e, "self_cpu_time_total", 0.0)
        if us > 0:
            out.append((e.key, float(us), int(e.count)))
    return sorted(out, key=lambda x: -x[1])


def profile_ours(P: Plan, R: Results, inputs: dict, provs: List[Timed], restore: Callable[[], None],
                 budget: Budget) -> None:
    from torch.profiler import ProfilerActivity, profile

    B, T, V = inputs["logits"].shape
    shp = dict(B=B, T=T, V=V, N=B * T, dtype="bf16")
    cuda = P.device == "cuda"
    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    for tp in [p for p in provs if p.name in P.profile_providers]:
        if budget.over():
            skip_spent(R, S, f"profile {tp.name}", **shp)
            continue
        try:
            inputs["lam"] = LAM if cfg_of(tp.cfg).aggregation == "lambda_grpo" else None
            runner = tp.make(inputs, tp.cfg)
            for _ in range(int(P.reps["warmup"])):
                runner.zero_grad()
                restore()
                runner.run_backward(runner.forward())
            runner.zero_grad()
            restore()
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=acts) as prof:
                runner.run_backward(runner.forward())
                if cuda:
                    torch.cuda.synchronize()
            runner.zero_grad()
            restore()
            ks = kernel_times(prof, cuda)
            total = sum(k[1] for k in ks) / 1e3
            top = "; ".join(f"{n[:60]} {us / 1e3:.3f} ms x{c}" for n, us, c in ks[:6])
            R.add(S, f"profile {tp.name}", "INFO", provider=tp.name, value=f"{total:.3f}",
                  unit="ms in kernels" if cuda else "ms CPU self time (dry run)",
                  detail=f"{len(ks)} kernel names, {sum(k[2] for k in ks)} launches; top: {top}",
                  **shp)
            R.extra.setdefault("profiles", {})[tp.name] = {"total_ms": total, "kernels": ks[:12]}
        except Exception as e:  # noqa: BLE001
            fail(R, S, f"profile {tp.name}", e, **shp)
        finally:
            x = inputs["logits"]
            x.grad = None
            x.requires_grad_(False)
            restore()
            free(P.device)


# ------------------------------------------------------------------------------------------
# the section
# ------------------------------------------------------------------------------------------
def run(P: Plan, R: Results, budget: Budget, traffic_handle=None) -> None:
    dev = P.device
    provs = timed_providers(P)
    R.note(S, "bytes_model: the provider's vocabulary-sized traffic under bench/gpu_model.py's byte model (a valid "
              "row read twice + its gradient written once, a masked row's gradient written once); frac_copy_bw = "
              "bytes_model / time / measured copy bandwidth; bytes_floor = valid rows read once + every gradient "
              "row written once (the least any fwd+bwd moves), frac_floor likewise")
    check_model(P, R, traffic_handle, timeout=min(60.0, max(1.0, budget.left())))
    for si, (B, T, V) in enumerate(P.timing):
        N = B * T
        if budget.over():
            skip_spent(R, S, f"N={N} V={V}", B=B, T=T, V=V, N=N)
            continue
        seed = 500 + si
        try:
            reason = too_big(dev, 2.2 * N * V * 2, 0.9)
            if reason:
                R.add(S, f"inputs N={N} V={V}", "SKIP", detail=reason, B=B, T=T, V=V, N=N)
                continue
            inputs = make_inputs(B, T, V, torch.bfloat16, dev, seed=seed)
        except Exception as e:  # noqa: BLE001
            fail(R, S, f"inputs N={N} V={V}", e, B=B, T=T, V=V, N=N)
            continue

        def restore(x=inputs["logits"], seed=seed):
            """Redraw the logits from their seed (make_inputs draws them first), in place."""
            g = torch.Generator(device=dev)
            g.manual_seed(seed)
            with torch.no_grad():
                fill_normal_(x, g, LOGIT_SCALE)

        for tp in provs:
            shp = dict(provider=tp.name, dtype="bf16", B=B, T=T, V=V, N=N)
            if budget.over():
                skip_spent(R, S, tp.label, **shp)
                continue
            inputs["lam"] = LAM if cfg_of(tp.cfg).aggregation == "lambda_grpo" else None
            reason = tp.skip(inputs, dev) if tp.skip else None
            if reason is None:
                reason = too_big(dev, tp.mem_per_logit * N * V)
            if reason:
                R.add(S, tp.label, "SKIP", detail=reason, **shp)
                continue
            try:
                time_one(P, R, tp, inputs, restore, budget)
            except Exception as e:  # noqa: BLE001
                if tp.peer:
                    tb = traceback.format_exc().strip().splitlines()
                    print("\n".join(tb[-8:]), flush=True)
                    R.add(S, tp.label, "ERROR", detail=f"{type(e).__name__}: {str(e)[:300]}", **shp)
                else:
                    fail(R, S, tp.label, e, **shp)
            finally:
                x = inputs["logits"]
                x.grad = None
                x.requires_grad_(False)
                if tp.inplace:
                    restore()
                free(dev)
        if (B, T, V) == tuple(P.profile_shape):
            profile_ours(P, R, inputs, provs, restore, budget)
        inputs = None
        free(dev)
