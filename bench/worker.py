"""One measurement in a fresh process: `python -m bench.worker SPEC_JSON OUT_JSON`.

SPEC_JSON holds {"case": Case dict, "provider": name, "reps_min", "reps_max", "budget_s", "device"}.
The worker builds the case's inputs, then times and measures one provider (or the floor).

Time: wall clock (time.perf_counter; CUDA events, i.e. device time, on a GPU) of forward and of fwd+bwd,
one warm-up call, then repeats until reps_max, or until budget_s is spent once reps_min are done.
The forward time is the forward part of each timed fwd+bwd call (autograd on, as in training).

Memory (CPU): the peak resident set size over the baseline, read from the kernel. Before each
timed call (outside the timed region) gradients are freed, glibc is asked to return free heap
pages (malloc_trim), the baseline VmRSS is read and the high-water mark is reset
(`echo 5 > /proc/self/clear_refs`); after the call VmHWM minus the baseline is that call's peak
additional memory (inputs excluded, the gradient buffer included). The maximum over the timed
calls is reported; the same number for the warm-up call (one-time allocations included) is kept
as `mem_first_call`. On CUDA: torch.cuda.max_memory_allocated over the allocated baseline.
"""

from __future__ import annotations

import ctypes
import gc
import json
import re
import statistics
import sys
import time
import traceback
from typing import Dict, List, Optional

import torch

from .cases import Case, make_inputs
from .providers import get, split_threads


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(field + r":\s+(\d+) kB", f.read())
    return int(m.group(1)) * 1024 if m else -1


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class MemProbe:
    """Peak memory above a baseline, for one region of code."""

    def __init__(self, device: str):
        self.device = device
        self.ok = device == "cuda" or _reset_hwm()

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _trim()
            self.base = _status_bytes("VmRSS")
            _reset_hwm()

    def peak(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status_bytes("VmHWM") - self.base


class Clock:
    """Marks and the seconds between them: perf_counter on CPU, CUDA events on a GPU (device time)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def between(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a


def _stats(xs: List[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _repeat(fn, reps_min: int, reps_max: int, budget_s: float, clock: Clock) -> List[float]:
    fn()  # warm-up
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < reps_max and (len(times) < reps_min or time.perf_counter() - start < budget_s):
        t0 = clock.mark()
        fn()
        times.append(clock.between(t0, clock.mark()))
    return times


def measure_floor(case: Case, inputs: dict, spec: dict) -> dict:
    """This machine's floor on these logits: torch.exp (allocating and out=), a read and a copy."""
    dev, clock = spec["device"], Clock(spec["device"])
    x = inputs["logits"].to(dev)
    buf = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    args = (spec["reps_min"], spec["reps_max"], spec["budget_s"], clock)
    res = {
        "exp_alloc": _stats(_repeat(lambda: torch.exp(x), *args)),
        "exp_out": _stats(_repeat(lambda: torch.exp(x, out=buf), *args)),
        "read_sum": _stats(_repeat(lambda: x.sum(), *args)),
        "copy": _stats(_repeat(lambda: buf.copy_(x), *args)),
    }
    res["bytes"] = nbytes
    res["gbps_read"] = nbytes / res["read_sum"]["median"] / 1e9
    res["gbps_copy"] = 2 * nbytes / res["copy"]["median"] / 1e9
    res["gbps_exp_out"] = 2 * nbytes / res["exp_out"]["median"] / 1e9
    return res


def measure_matmul_floor(case: Case, inputs: dict, spec: dict) -> dict:
    """The hidden task's floor: the three LM-head matmuls alone, in the case's dtype, with the
    worker's threads: logits = h W^T, dhidden = dlogits W, dW = dlogits^T h, each into a
    preallocated, already-mapped output (`out=`: no page faults, no allocation), dlogits a
    separate (n, V) buffer of random values (not the logits: a fresh dlogits-shaped buffer, as a
    backward gets). Measured over all N tokens ("all") and over the valid (unmasked) tokens only
    ("valid": the rows our fused path computes). One small warm-up (the first 256 rows), then
    reps_min timed repeats of the three; each matmul's time is kept too."""
    dev, clock = spec["device"], Clock(spec["device"])
    B, T, H = inputs["hidden"].shape
    h_all = inputs["hidden"].to(dev).reshape(B * T, H)
    W = inputs["weight"].to(dev)
    idx = inputs["mask"].to(dev).reshape(-1).nonzero().squeeze(1)
    res: dict = {"n_valid": int(idx.numel())}
    g = torch.Generator(device=dev).manual_seed(7)
    for name, h in (("all", h_all), ("valid", h_all.index_select(0, idx).contiguous())):
        n = h.shape[0]
        logits = torch.zeros((n, W.shape[0]), dtype=h.dtype, device=dev)
        dl = torch.empty((n, W.shape[0]), dtype=h.dtype, device=dev).normal_(generator=g).mul_(1e-3)
        dh = torch.zeros((n, H), dtype=h.dtype, device=dev)
        dW = torch.zeros_like(W)
        w = min(n, 256)
        torch.mm(h[:w], W.t(), out=logits[:w])
        torch.mm(dl[:w], W, out=dh[:w])
        torch.mm(dl[:w].t(), h[:w], out=dW)
        parts: Dict[str, List[float]] = {"logits": [], "dhidden": [], "dW": []}
        tot: List[float] = []
        for _ in range(spec["reps_min"]):
            t0 = clock.mark()
            torch.mm(h, W.t(), out=logits)
            t1 = clock.mark()
            torch.mm(dl, W, out=dh)
            t2 = clock.mark()
            torch.mm(dl.t(), h, out=dW)
            t3 = clock.mark()
            a, b, c = clock.between(t0, t1), clock.between(t1, t2), clock.between(t2, t3)
            parts["logits"].append(a)
            parts["dhidden"].append(b)
            parts["dW"].append(c)
            tot.append(a + b + c)
        res[f"mm_{name}"] = _stats(tot)
        for k, v in parts.items():
            res[f"mm_{name}_{k}"] = _stats(v)
        res[f"mm_{name}_gflops"] = 3 * 2 * n * W.shape[0] * H / res[f"mm_{name}"]["median"] / 1e9
        del logits, dl, dh, dW
        gc.collect()
        _trim()
    return res


def measure_provider(case: Case, inputs: dict, spec: dict) -> dict:
    dev, clock = spec["device"], Clock(spec["device"])
    p = get(spec["provider"], case.task)
    runner = p.make(case, inputs, dev)
    probe = MemProbe(dev)
    fwd_t: List[float] = []
    tot_t: List[float] = []

    def call(record: bool, mem: Optional[Dict[str, int]] = None):
        t0 = clock.mark()
        out = runner.forward()
        t1 = clock.mark()
        if mem is not None:
            mem["fwd"] = probe.peak()
        t1b = clock.mark()
        runner.run_backward(out)
        t2 = clock.mark()
        if mem is not None:
            mem["fwdbwd"] = probe.peak()
        if record:
            fwd_t.append(clock.between(t0, t1))
            tot_t.append(clock.between(t0, t1) + clock.between(t1b, t2))
        del out

    first: Dict[str, int] = {}
    runner.zero_grad()
    probe.start()
    t_first = time.perf_counter()
    call(False, first)
    t_first = time.perf_counter() - t_first
    peaks: Dict[str, int] = {"fwd": 0, "fwdbwd": 0}
    start = time.perf_counter()
    while len(tot_t) < spec["reps_max"] and (len(tot_t) < spec["reps_min"] or
                                             time.perf_counter() - start < spec["budget_s"]):
        mem: Dict[str, int] = {}
        runner.zero_grad()  # the previous gradient must not sit in the baseline
        probe.start()  # outside the timed region: gc, malloc_trim, baseline, reset of the high-water mark
        call(True, mem)
        peaks = {k: max(peaks[k], mem[k]) for k in peaks}
    runner.zero_grad()
    return {"fwd": _stats(fwd_t), "fwdbwd": _stats(tot_t), "first_call_s": t_first,
            "mem_fwd": peaks["fwd"], "mem_fwdbwd": peaks["fwdbwd"],
            "mem_first_call": first["fwdbwd"], "mem_method_ok": probe.ok, "notes": runner.notes}


def calibrate_memory() -> dict:
    """Measure a known 256 MiB allocation with the same probe, so the report can show the method works."""
    probe = MemProbe("cpu")
    probe.start()
    t = torch.ones(64 * 1024 * 1024, dtype=torch.float32)
    got = probe.peak()
    del t
    return {"expected": 256 * 1024 * 1024, "measured": got, "ok": probe.ok}


def main(argv: List[str]) -> int:
    spec = json.loads(argv[0])
    out_path = argv[1]
    result: dict = {"provider": spec["provider"]}
    threads = split_threads(spec["provider"])[1] or spec.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    result["threads"] = torch.get_num_threads()
    try:
        if spec["provider"] == "calibrate":
            result.update(status="ok", **calibrate_memory())
        else:
            case = Case.from_dict(spec["case"])
            t0 = time.perf_counter()
            inputs = make_inputs(case, spec.get("cache_dir"))
            result["inputs_s"] = time.perf_counter() - t0
            if split_threads(spec["provider"])[0] == "floor" and case.task == "hidden":
                result.update(measure_matmul_floor(case, inputs, spec))
            elif split_threads(spec["provider"])[0] == "floor":
                result.update(measure_floor(case, inputs, spec))
            else:
                result.update(measure_provider(case, inputs, spec))
            result["status"] = "ok"
    except Exception as e:  # reported by the parent, which decides whether the run fails
        result.update(status="error", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
