"""`python -m bench [--quick]`: check that all providers agree, then time them against the floor.

Exit status: 0 when every provider that ran agreed with the float64 truth and every timed
measurement completed; 1 when a provider disagreed or errored (nothing is timed after a
disagreement); providers that cannot run here are skipped with a printed reason.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

import torch

from . import grid as grid_mod
from . import report
from .cases import Case
from .checks import check_case
from .providers import EXPECTED_PEAK_MULTIPLE, PROVIDERS, get, providers_for, split_threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(mod: str) -> str:
    try:
        return getattr(importlib.import_module(mod), "__version__", "?")
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"not importable ({type(e).__name__})"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mem_total_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def machine_meta(device: str, argv: List[str], run_id: str) -> dict:
    return {
        "run_id": run_id,
        "utc_start": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python -m bench " + " ".join(argv),
        "device": device,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "worker_threads": "default",
        "mem_total_gib": f"{_mem_total_gib():.1f}",
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "trl": _version("trl"),
        "liger_kernel": _liger_version(),
        "transformers": _version("transformers"),
        "lambda_grpo": _version("lambda_grpo"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": "yes" if _git("status", "--porcelain", "--untracked-files=no") else "no",
        "loadavg_start": _loadavg(),
    }


def _liger_version() -> str:
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:  # noqa: BLE001
        return "not installed"


def run_worker(spec: dict, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(spec), out], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)
        try:
            with open(out) as f:
                res = json.load(f)
        except (OSError, json.JSONDecodeError):
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            res = {"status": "error", "reason": f"worker exited {proc.returncode} without a result "
                                                f"(killed for memory?) {' | '.join(tail)}"}
    except subprocess.TimeoutExpired:
        res = {"status": "error", "reason": f"timed out after {timeout:.0f} s"}
    finally:
        if os.path.exists(out):
            os.unlink(out)
    return res


def _inputs_bytes(case: Case) -> int:
    if case.task == "logits":
        return case.logits_bytes
    return (case.N + case.V) * case.H * case.itemsize


def kernel_report(timeout: float = 300) -> str:
    """Output of `python -m bench.kernels` (ptxas registers/spills per Triton kernel) when present."""
    try:
        spec = importlib.util.find_spec("bench.kernels")
    except (ImportError, ValueError) as e:
        spec, err = None, e
    else:
        err = "bench/kernels.py does not exist in this checkout"
    if spec is None:
        return f"(kernel report skipped: {err})"
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.kernels"], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"(kernel report skipped: python -m bench.kernels did not finish in {timeout:.0f} s)"
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-5:])
        return f"(kernel report failed: python -m bench.kernels exited {proc.returncode})\n{tail}"
    return proc.stdout.strip() or "(kernel report printed nothing)"


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="CI-sized run: small shapes, a fixed amount of work (3 timed repeats, no time budget)")
    ap.add_argument("--grid", choices=["quick", "full", "smoke", "key", "cpu", "hidden"],
                    help="which grid to run (default: full, or quick with --quick; smoke = pipeline test; "
                         "key = only the acceptance case V=151936, N=2048, fp32; cpu = issue 9's CPU step: "
                         "fused and two-pass schedules with and without inplace_backward at that shape; "
                         "hidden = issue 10's hidden-states job: N 2048/4096 x H 576/896 x V 49152/151936, "
                         "fp32, ours fused-linear next to the three-matmul floor, Liger, materialised logits, "
                         "TRL's and verl's fused heads)")
    ap.add_argument("--out", help="output directory (default bench/results/<utc time>[-quick])")
    ap.add_argument("--providers", help="comma-separated provider names to include (default: all)")
    ap.add_argument("--match", help="comma-separated substrings: time only the cases whose key (e.g. "
                    "hidden-grpo-fp32-V49152-N2048-H576) contains one of them (the checks still run in full)")
    ap.add_argument("--check-only", action="store_true", help="run the agreement check and stop")
    ap.add_argument("--max-minutes", type=float,
                    help="wall-time budget of the whole run; no new measurement starts after it (default: "
                         "12.5 for a full run; none for quick and smoke runs, which do a fixed amount of work)")
    ap.add_argument("--mem-budget-gib", type=float, default=11.0,
                    help="skip a provider whose expected peak (inputs + its typical multiple of one (N, V) "
                         "tensor) exceeds this; the machine is shared (default 11)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, help="intra-op threads of every worker (default: torch's default)")
    ap.add_argument("--no-gpu-model", action="store_true")
    args = ap.parse_args(argv)

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    names = args.providers.split(",") if args.providers else None
    if names:
        unknown = sorted(set(names) - {p.name for p in PROVIDERS} - {"floor"})
        if unknown:
            ap.error(f"--providers: unknown {unknown}; known: {sorted({p.name for p in PROVIDERS} | {'floor'})}")
    grid_name = args.grid or ("quick" if args.quick else "full")
    checks_cases, timed = getattr(grid_mod, grid_name)()
    if args.match:
        subs = [m for m in args.match.split(",") if m]
        timed = [(c, p) for c, p in timed if any(m in c.key() for m in subs)]
        if not timed:
            ap.error(f"--match {args.match!r}: no case of grid {grid_name!r} matches")
    small = grid_name in ("quick", "smoke")
    fixed = small or grid_name == "hidden"
    # Quick and smoke runs (CI) do a fixed amount of work: every listed measurement, exactly 3
    # timed repeats, no wall-time budget. A loaded machine makes them slower, never different
    # (a budget once cut the floor's timing on a loaded CI machine). Timeouts are hang guards.
    # The hidden grid too: each fwd+bwd there is seconds to a minute of matmuls, so 3 repeats and
    # no budget (about an hour on this machine when it is quiet).
    if args.max_minutes is not None:
        max_s = 60 * args.max_minutes
    else:
        max_s = float("inf") if fixed else 60 * 12.5
    reps = dict(reps_min=3, reps_max=3, budget_s=0.0) if fixed else dict(reps_min=3, reps_max=7, budget_s=12.0)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_id = stamp + ("" if grid_name == "full" else f"-{grid_name}")
    out_dir = args.out or os.path.join(REPO, "bench", "results", run_id)
    os.makedirs(out_dir, exist_ok=True)
    meta = machine_meta(device, argv, run_id)
    # old/ref log-probs of a case are computed once per run and shared by its worker processes
    cache_dir = os.path.join(out_dir, ".inputs")
    if args.threads:
        meta["worker_threads"] = str(args.threads)
    t_start = time.perf_counter()

    print(f"bench {grid_name} run {run_id} -> {out_dir}")
    for k in ("cpu", "cores", "mem_total_gib", "torch", "triton", "trl", "liger_kernel", "git_commit",
              "loadavg_start"):
        print(f"  {k}: {meta[k]}")

    # 1. Memory method sanity: a known 256 MiB allocation, measured with the same probe.
    cal = run_worker({"provider": "calibrate"}, timeout=120) if device == "cpu" else {"status": "n/a"}
    if cal.get("status") == "ok":
        print(f"memory probe (VmHWM over VmRSS after clear_refs): 256 MiB allocation measured as "
              f"{cal['measured'] / 2**20:.1f} MiB")
        meta["mem_calibration_mib"] = f"{cal['measured'] / 2**20:.1f}"
    else:
        meta["mem_calibration_mib"] = "n/a"

    # 2. Agreement, before anything is timed.
    print("agreement check against the float64 truth (tolerances per dtype, see bench/checks.py):")
    checks: List[dict] = []
    failed = []
    compile_checked = set()
    for case in checks_cases:
        provs = providers_for(case.task, names)
        if case.task == "logits" and any(p.name == "compile_fp32" for p in provs):
            # One compile per shape costs 20-60 s on this machine: check it once per dtype.
            if case.dtype in compile_checked:
                provs = [p for p in provs if p.name != "compile_fp32"]
            elif not get("compile_fp32", "logits").skip(case, device):
                compile_checked.add(case.dtype)
        for r in check_case(case, provs, device):
            r["case"] = case
            r["label"] = get(r["provider"], case.task).label
            checks.append(r)
            if r["status"] in ("DISAGREES", "ERROR"):
                failed.append(f"{case.key()} {r['provider']}: {r['status']} {r.get('errors', r.get('reason'))}")
    print(f"check phase: {time.perf_counter() - t_start:.0f} s")
    results: List[dict] = []
    if failed:
        print("PROVIDERS DISAGREE — nothing is timed:")
        for f_ in failed:
            print("  " + f_)
    elif not args.check_only:
        # 3. Timing, each provider in its own process.
        for case, provs in timed:
            if results and fixed and not small:
                # a long run (--grid hidden: about an hour) leaves what it has measured so far
                _write_partial(out_dir, meta, results, checks)
            print(f"\n{report.case_title(case)}")
            wanted = [n for n in provs if names is None or split_threads(n)[0] in names]
            for name in wanted:
                base = split_threads(name)[0]
                if base == "floor":
                    label = ("floor: the three LM-head matmuls alone (logits, dhidden, dW)" if case.task == "hidden"
                             else "floor: torch.exp / sum / copy over the logits")
                else:
                    label = get(name, case.task).label
                r = {"case": case, "provider": name, "label": label, "loadavg_1m": _loadavg().split(" ")[0]}
                reason = None
                if base != "floor":
                    reason = get(name, case.task).skip(case, device)
                if reason is None:
                    est = _inputs_bytes(case) + EXPECTED_PEAK_MULTIPLE.get(base, 2.0) * case.logits_bytes
                    if est > args.mem_budget_gib * 2**30:
                        reason = (f"expected peak ~{est / 2**30:.1f} GiB (inputs + "
                                  f"{EXPECTED_PEAK_MULTIPLE.get(base, 2.0):g} x one (N, V) tensor) exceeds the "
                                  f"{args.mem_budget_gib:g} GiB budget of this shared machine")
                if reason is None and time.perf_counter() - t_start > max_s:
                    reason = f"time budget of the run ({max_s / 60:.0f} min) spent"
                if reason is not None:
                    r.update(status="skipped", reason=reason)
                    print(f"  {name:<15} skipped: {reason}")
                    results.append(r)
                    continue
                spec = {"case": case.to_dict(), "provider": name, "device": device, "threads": args.threads,
                        "cache_dir": cache_dir, **reps}
                t0 = time.perf_counter()
                res = run_worker(spec, timeout=600)  # a hang guard, not a speed limit
                r.update(res)
                r["wall_s"] = time.perf_counter() - t0
                results.append(r)
                if r["status"] != "ok":
                    failed.append(f"{case.key()} {name}: {r.get('reason')}")
                    print(f"  {name:<15} ERROR: {r.get('reason')}")
                elif base == "floor" and case.task == "hidden":
                    print(f"  {name:<15} 3 matmuls: all {case.N} tokens "
                          f"{report._spread(r['mm_all'])} ms ({r['mm_all_gflops']:.0f} GFLOP/s), valid "
                          f"{r['n_valid']} tokens {report._spread(r['mm_valid'])} ms  [{r['wall_s']:.0f} s, load "
                          f"{r['loadavg_1m']}]")
                elif base == "floor":
                    print(f"  {name:<15} exp(out=) {report._ms(r['exp_out']['median'])} ms, exp(alloc) "
                          f"{report._ms(r['exp_alloc']['median'])} ms, read {r['gbps_read']:.1f} GB/s, copy "
                          f"{r['gbps_copy']:.1f} GB/s  [{r['wall_s']:.0f} s]")
                else:
                    print(f"  {name:<15} fwd {report._ms(r['fwd']['median'])} ms, fwd+bwd "
                          f"{report._spread(r['fwdbwd'])} ms, peak extra {r['mem_fwdbwd'] / 2**20:.0f} MiB "
                          f"[{r['wall_s']:.0f} s, load {r['loadavg_1m']}]")
        report.derive([r for r in results if r["status"] == "ok"])
        for line in cpu_targets(results) + report.hidden_targets(results):
            print(line)

    meta["loadavg_end"] = _loadavg()
    meta["wall_s"] = f"{time.perf_counter() - t_start:.0f}"
    csv_path = os.path.join(out_dir, "results.csv")
    report.write_csv(csv_path, meta, results, checks)
    md = render_markdown(meta, checks, results, timed, device, args, out_dir)
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w") as f:
        f.write(md)
    print(f"\nwrote {csv_path}\nwrote {md_path}")
    if results:
        png = os.path.join(out_dir, "bench.png")
        err = report.plot(png, results)
        print(f"wrote {png}" if err is None else f"plot skipped: {err}")
    if os.path.isdir(cache_dir):
        shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"total {time.perf_counter() - t_start:.0f} s, load average at end {meta['loadavg_end']}")
    if failed:
        print(f"FAILED: {len(failed)} problem(s)")
        for f_ in failed:
            print("  " + f_)
        return 1
    return 0


def _write_partial(out_dir: str, meta: dict, results: List[dict], checks: List[dict]) -> None:
    """results-partial.csv and report-partial.md of the cases measured so far (derived ratios
    recomputed); the final results.csv and report.md replace nothing of these."""
    done = [dict(r) for r in results]
    report.derive([r for r in done if r["status"] == "ok"])
    m = dict(meta, loadavg_end=_loadavg(), wall_s="(partial)")
    report.write_csv(os.path.join(out_dir, "results-partial.csv"), m, done, checks)
    L = [f"# Partial report of run {meta['run_id']} (cases measured so far)", "",
         f"Command: `{meta['command']}`. Load average at start {meta['loadavg_start']}, now {m['loadavg_end']}.", ""]
    L += report.hidden_targets(done)
    seen = []
    for r in done:
        if r["case"] not in seen:
            seen.append(r["case"])
    for case in seen:
        L += report.markdown_case([r for r in done if r["case"] == case])
    with open(os.path.join(out_dir, "report-partial.md"), "w") as f:
        f.write("\n".join(L))


def _targets(results: List[dict], case: Optional[Case]) -> List[str]:
    if case is None:
        return []
    rows = {r["provider"]: r for r in results if r["case"] == case}
    ours = rows.get("torch")
    lines = ["## Targets (V = 151 936, N = 2 048, fp32, grpo, fwd+bwd)", ""]
    if ours is None or ours["status"] != "ok":
        reason = "" if ours is None else ours.get("reason", "")
        return lines + [f"Our torch backend was not measured here: {reason}", ""]
    t = ours["fwdbwd"]["median"]

    def verdict(ok):
        return "**met**" if ok else "**missed**"

    for name, what in (("reference", "eager reference"), ("trl", "TRL-style loss"), ("eager_fp32", "eager fp32")):
        r = rows.get(name)
        if r is not None and r["status"] == "ok":
            s = r["fwdbwd"]["median"] / t
            target = " (target ≥ 4×)" if name != "eager_fp32" else " (no target; context)"
            lines.append(f"- ours vs {what}: {s:.2f}× faster{target}"
                         + (f" — {verdict(s >= 4)}" if name != "eager_fp32" else ""))
        else:
            lines.append(f"- ours vs {what}: not measured ({'' if r is None else r.get('reason', '')})")
    x = ours.get("derived", {}).get("x_floor2")
    xa = ours.get("derived", {}).get("x_floor2_alloc")
    if x is not None:
        lines.append(f"- ours vs the two-exp-pass floor (2 × exp with out=): {x:.2f}× (target ≤ 1.5×) — "
                     f"{verdict(x <= 1.5)}; vs exp(out=) + exp(allocating) (the gradient is fresh memory): "
                     f"{xa:.2f}×")
    m = ours["mem_fwdbwd"] / case.logits_bytes
    lines.append(f"- ours peak extra memory: {ours['mem_fwdbwd'] / 2**20:.0f} MiB = {m:.2f}× one dlogits buffer "
                 f"({case.logits_bytes / 2**20:.0f} MiB) (target ≤ 1.25×) — {verdict(m <= 1.25)}")
    one = rows.get("torch@1t")
    if one is not None and one["status"] == "ok":
        t1 = one["fwdbwd"]["median"]
        parts = [f"{what} {rows[n]['fwdbwd']['median'] / t1:.2f}×" for n, what in
                 (("reference", "vs eager reference"), ("trl", "vs TRL-style"), ("eager_fp32", "vs eager fp32"))
                 if rows.get(n, {}).get("status") == "ok"]
        x1 = one.get("derived", {}).get("x_floor2")
        lines.append(f"- the same backend with 1 intra-op thread: {t1 * 1e3:.0f} ms fwd+bwd; "
                     + ", ".join(parts) + (f"; {x1:.2f}× the two-exp-pass floor" if x1 is not None else "")
                     + " (the other providers at their default 2 threads; see the N = 512 table for all of "
                       "them at 1 thread)")
    lines.append("")
    return lines


def cpu_targets(results: List[dict]) -> List[str]:
    """Issue 9's CPU targets at V = 151 936, N = 2 048, fp32 (`--grid cpu`), when measured: the fused
    schedule (dapo) <= 1.5x the two-exp-pass floor, the two-pass schedule (lambda_both) <= 2.5x it
    and >= 6x faster than the eager reference, each with and without inplace_backward."""
    def row(mode, name):
        return next((r for r in results if r["case"].task == "logits" and r["case"].V == 151936
                     and r["case"].N == 2048 and r["case"].dtype == "fp32" and r["case"].mode == mode
                     and r["provider"] == name and r["status"] == "ok"), None)

    if row("dapo", "torch") is None and row("lambda_both", "torch") is None:
        return []
    lines = ["## Targets of issue 9 (CPU step, V = 151 936, N = 2 048, fp32, fwd+bwd, fresh gradient each call)", "",
             "| schedule | inplace_backward | fwd+bwd median (min–max) ms | two-exp-pass floor ms | × floor | target | "
             "eager reference ms | × faster than reference | target |",
             "|---|---|---:|---:|---:|---|---:|---:|---|"]

    def verdict(ok):
        return "**met**" if ok else "**missed**"

    for mode, what, xmax, ref_min in (("dapo", "fused (dapo)", 1.5, None), ("lambda_both", "two-pass (lambda_grpo, "
                                                                         "trace='both')", 2.5, 6.0)):
        ref = row(mode, "reference")
        floor = row(mode, "floor")
        for name, ip in (("torch", "no"), ("torch_inplace", "yes"), ("torch@1t", "no, 1 thread"),
                         ("torch_inplace@1t", "yes, 1 thread")):
            r = row(mode, name)
            if r is None:
                lines.append(f"| {what} | {ip} | not measured | | | | | | |")
                continue
            t = r["fwdbwd"]
            x = r.get("derived", {}).get("x_floor2")
            fl_r = row(mode, "floor@1t") if name.endswith("@1t") else floor
            fl = "-" if fl_r is None else report._ms(2 * fl_r["exp_out"]["median"])
            xs = "-" if x is None else f"{x:.2f}×"
            tx = "-" if x is None else f"≤ {xmax:g}× {verdict(x <= xmax)}"
            if name.endswith("@1t"):
                lines.append(f"| {what} | {ip} | {report._ms(t['median'])} ({report._ms(t['min'])}–"
                             f"{report._ms(t['max'])}) | {fl} (1 thread) | {xs} | context | | | |")
                continue
            if ref is not None:
                sp = ref["fwdbwd"]["median"] / t["median"]
                refs, sps = report._ms(ref["fwdbwd"]["median"]), f"{sp:.1f}×"
                tr = "" if ref_min is None else f"≥ {ref_min:g}× {verdict(sp >= ref_min)}"
            else:
                refs, sps, tr = "not measured", "-", "" if ref_min is None else "not measured"
            lines.append(f"| {what} | {ip} | {report._ms(t['median'])} ({report._ms(t['min'])}–{report._ms(t['max'])}) "
                         f"| {fl} | {xs} | {tx} | {refs} | {sps} | {tr} |")
    lines += ["", "Each schedule's ratio uses the floor measured in its own case (same load; the 1-thread rows the "
                  "floor with 1 thread); the load average is in each case's table below. The targets are judged on "
                  "the default-thread rows; the 1-thread rows are context (the work without OpenMP barriers).", ""]
    return lines


def render_markdown(meta, checks, results, timed, device, args, out_dir) -> str:
    L = [f"# lambda-grpo benchmark: run {meta['run_id']}", "",
         f"Command: `{meta['command']}` (from the repository root). Wall time of checks and measurements "
         f"{meta['wall_s']} s.", "",
         f"Machine: {meta['cpu']}, {meta['cores']} cores ({meta['torch_threads']} torch threads by default; workers: "
         f"{meta['worker_threads']}, '[1 intra-op thread]' rows: 1), "
         f"{meta['mem_total_gib']} GiB, device {meta['device']}, GPU: {meta['gpu']}. "
         f"Load average (1/5/15 min) at start {meta['loadavg_start']}, at end {meta['loadavg_end']} "
         f"(the machine is shared: other jobs run during the measurement).", "",
         f"Versions: python {meta['python']}, torch {meta['torch']}, triton {meta['triton']}, trl {meta['trl']}, "
         f"liger-kernel {meta['liger_kernel']}, transformers {meta['transformers']}, lambda_grpo "
         f"{meta['lambda_grpo']}; git commit {meta['git_commit']} (uncommitted changes to tracked files: "
         f"{meta['git_dirty']}).", "",
         "Method: each provider runs in its own subprocess on the same deterministic inputs. Time = wall clock, "
         "one warm-up call, then 3-7 repeats (median, min–max); the forward time is the forward part of each "
         "fwd+bwd call. Peak extra memory = high-water mark of the process's resident set (VmHWM, reset via "
         "`/proc/self/clear_refs`) over its resident set just before the call (inputs allocated, previous "
         "gradients freed, `malloc_trim`), maximised over the timed repeats; it includes the gradient buffer. "
         f"Probe check: a 256 MiB allocation measures as {meta.get('mem_calibration_mib', 'n/a')} MiB. "
         "Floor = this machine's `torch.exp` over the same logits; the '× 2-exp floor' column divides by two "
         "exp passes with `out=` (no page faults), the strictest floor.", ""]
    # agreement
    L += ["## Agreement with the float64 truth (before timing)", "",
          "Relative errors: |loss − truth| / max(|truth|, 0.01) and max|grad − truth| / max|truth| (max over the "
          "leaves: logits, λ, or hidden states and weight). Tolerances in bench/checks.py: fp32 1e-4 / 1e-3; bf16 "
          "3e-2 / 3e-2; TRL's bf16 path (softmax in bf16) 1e-1 on the loss and at most 5% of token rows off.", "",
          "| case | provider | status | rel. error loss | rel. error grads | note |", "|---|---|---|---:|---:|---|"]
    skipped_checks = {}
    for c in checks:
        errs = c.get("errors")
        if errs:
            g = max((v for k, v in errs.items() if k != "loss" and not k.endswith("_rows_off")), default=float("nan"))
            note = (f"{errs['dlogits_rows_off']:.1%} of token rows off by > 0.1 (clip decisions flipped by bf16 "
                    "log-probs)") if "dlogits_rows_off" in errs else ""
            L.append(f"| {c['case'].key()} | {c['provider']} | {c['status']} | {errs['loss']:.1e} | {g:.1e} | {note} |")
        elif c["status"] == "skipped":
            skipped_checks.setdefault(c["provider"], set()).add(c.get("reason", ""))
        else:
            L.append(f"| {c['case'].key()} | {c['provider']} | {c['status']} | - | - | {c.get('reason', '')} |")
    L.append("")
    for prov, reasons in skipped_checks.items():
        L.append(f"- {prov} skipped in the cases it cannot run: {'; '.join(sorted(reasons))}")
    L.append("")
    L += _targets(results, grid_mod.key_case(timed))
    L += cpu_targets(results)
    L += report.hidden_targets(results)
    if results:
        L += ["## Timings", "",
              "'ours is × faster' = provider's fwd+bwd median / ours (backend='torch'; in the hidden task "
              "F.linear + backend='torch'). '× dlogits' = peak extra memory / one (N, V) buffer in the logits' dtype.",
              ""]
        seen = []
        for r in results:
            if r["case"] not in seen:
                seen.append(r["case"])
        for case in seen:
            L += report.markdown_case([r for r in results if r["case"] == case])
        L += ["Plot: `" + os.path.relpath(os.path.join(out_dir, "bench.png"), REPO) + "`", ""]
    if not args.no_gpu_model:
        L += gpu_model_section()
    if (args.grid or ("quick" if args.quick else "full")) != "full":
        text = ("(kernel report not run in this grid: `python -m bench.kernels` compiles every kernel "
                "ahead of time, about a minute here; a full run includes it)")
    else:
        text = kernel_report()
    print(text.splitlines()[0] if text.startswith("(") else "kernel report: included")
    L += ["## Triton kernel report (`python -m bench.kernels`)", "", "```", text, "```", ""]
    return "\n".join(L)


def gpu_model_section() -> List[str]:
    from . import gpu_model

    L = ["## GPU model — a MODEL, not a measurement", "",
         "No GPU was used. Bytes of vocabulary-sized HBM traffic per token for one fwd+bwd, and the time that "
         f"traffic takes at the {gpu_model.H100_NAME} for N = 2 048 tokens, V = 151 936. 'passes' = multiples "
         "of one (N, V) tensor in the logits' dtype. How each row is obtained is in its last column "
         "(bench/gpu_model.py).", "",
         "| design | dtype | passes | MB / token | modelled H100 ms @ N=2048 | × ours | how |",
         "|---|---|---:|---:|---:|---:|---|"]
    for dtype in ("fp32", "bf16"):
        try:
            rows = gpu_model.model_rows(PROVIDERS, 151936, dtype, "grpo", 2048)
        except Exception as e:  # noqa: BLE001
            L.append(f"| (model failed for {dtype}: {type(e).__name__}: {e}) | | | | | | |")
            continue
        for r in rows:
            L.append(f"| {r['design']} | {dtype} | {r['passes']:.1f} | {r['bytes_per_token'] / 1e6:.2f} | "
                     f"{r['h100_ms']:.2f} | {r['x_ours']:.1f} | {r['how']} |")
    L.append("")
    return L
