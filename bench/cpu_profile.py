"""`python -m bench.cpu_profile [--threads N] [--reps R]`: where a CPU step of backend="torch" spends
its time (issue 9), at V = 151 936, N = 2 048, fp32 — the `--grid cpu` cases.

For the fused schedule (dapo) and the two-pass schedule (lambda_grpo, trace="both"), each with and
without inplace_backward, one step = forward + backward on a fresh gradient (the previous one is
freed before the step, outside the measurement). Printed per step (median of the repeats): wall
time; the process's user and system CPU time (getrusage: system time is almost all page faults
of the new gradient); minor page faults; and the wall time of each engine call (vocabulary
forward, fused pass, row pass, backward) measured by wrapping them. Then the Python and dispatch
overhead: the same steps at V = 1 000 with the same 3 rows per chunk, so that the arithmetic is
negligible and what remains is the per-chunk interpreter and dispatcher work.
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import statistics
import time

import torch

import lambda_grpo as lg
import lambda_grpo._vocab_torch as engine

from .cases import MODES, Case, make_inputs

SCHEDULES = (("fused", "dapo"), ("two-pass", "lambda_both"))
TIMED = ("vocab_forward", "vocab_fused", "row_pass", "vocab_backward")


def _wrap(acc):
    """Accumulate the wall time of the engine calls into acc (name -> seconds); returns an undo."""
    saved = {n: getattr(engine, n) for n in TIMED}

    def make(name, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[name] += time.perf_counter() - t0
        return timed

    for n, fn in saved.items():
        setattr(engine, n, make(n, fn))
    return lambda: [setattr(engine, n, fn) for n, fn in saved.items()]


def _steps(V: int, mode: str, inplace: bool, reps: int, chunk_elements=None) -> dict:
    case = Case("logits", V, 2048, "fp32", mode)
    inputs = make_inputs(case)
    src = inputs["logits"]
    work = src.clone() if inplace else src
    cfg = lg.LossConfig(**MODES[mode])
    kw = {k: inputs[k] for k in ("tokens", "mask", "advantages", "old_logp", "ref_logp", "group_size")}
    old_chunk = engine.CHUNK_ELEMENTS
    if chunk_elements is not None:
        engine.CHUNK_ELEMENTS = chunk_elements
    acc: dict = collections.defaultdict(float)
    undo = _wrap(acc)
    rows = []
    try:
        for i in range(reps + 1):  # the first step is a warm-up
            if inplace:
                work.copy_(src)
            x = work.detach().requires_grad_(True)
            lam = torch.tensor(0.3, requires_grad=True) if cfg.aggregation == "lambda_grpo" else None
            acc.clear()
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            out = lg.grpo_loss(x, lam=lam, config=cfg, backend="torch", inplace_backward=inplace, **kw)
            out.loss.backward()
            t = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            if i:
                rows.append(dict(step=t, user=r1.ru_utime - r0.ru_utime, sys=r1.ru_stime - r0.ru_stime,
                                 faults=r1.ru_minflt - r0.ru_minflt, **{n: acc.get(n, 0.0) for n in TIMED}))
            x.grad = None
            del out, x
    finally:
        undo()
        engine.CHUNK_ELEMENTS = old_chunk
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu_profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, help="intra-op threads (default: torch's default)")
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; medians of {args.reps} steps, ms")
    ms = lambda v: f"{v * 1e3:.0f}"  # noqa: E731
    print("\nV = 151 936, N = 2 048, fp32: step = forward + backward on a fresh gradient")
    print("| schedule | inplace | step | user CPU | system CPU | minor faults | "
          + " | ".join(TIMED) + " |")
    print("|---|---|" + "---:|" * (4 + len(TIMED)))
    for name, mode in SCHEDULES:
        for inplace in (False, True):
            r = _steps(151936, mode, inplace, args.reps)
            print(f"| {name} | {'yes' if inplace else 'no'} | {ms(r['step'])} | {ms(r['user'])} | {ms(r['sys'])} | "
                  f"{r['faults']:.0f} | " + " | ".join(ms(r[n]) for n in TIMED) + " |")
    print("\nPython and dispatch overhead: the same steps at V = 1 000, 3 rows per chunk (as at V = 151 936)")
    for name, mode in SCHEDULES:
        for inplace in (False, True):
            r = _steps(1000, mode, inplace, args.reps, chunk_elements=3 * 1000)
            print(f"  {name}, inplace={inplace}: {ms(r['step'])} ms per step")
    print(f"\nload average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
