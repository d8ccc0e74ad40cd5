"""The run: command line, plan, watchdog, the sections in order, the outputs after each."""

from __future__ import annotations

import argparse
import datetime as dt
import faulthandler
import os
import platform
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

import torch

from .common import REPO, SECTIONS, Budget, Plan, Results, dry_plan, fail, free, gpu_plan

SECTION_HELP = ", ".join(SECTIONS)
AUTOSAVE_S = 10.0


def _version_dist(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "not installed"


def _meta(P: Plan, run_id: str) -> Dict[str, str]:
    from ..run import _liger_version, _loadavg, _version
    from .provenance import code_record

    meta = {
        "run_id": run_id, "gpu": torch.cuda.get_device_name(0) if P.device == "cuda" else "none (dry run, CPU)",
        "python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
        "triton": _version("triton"), "liger_kernel": _liger_version(), "trl": _version_dist("trl"),
        "transformers": _version("transformers"), "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "cores": str(os.cpu_count()), "loadavg_start": _loadavg(),
    }
    meta.update(code_record())
    return meta


def _parser() -> argparse.ArgumentParser:
    from . import __doc__ as doc

    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output folder (default bench/results/gpu-<utc time>[-dry])")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, TRITON_INTERPRET=1, tiny sizes: the same code path, for the test suite")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTION_HELP}")
    ap.add_argument("--stamp", action="store_true",
                    help="write bench/results/commit-under-test.json (git HEAD, dirty flag, source tree hash) "
                         "and exit: run it on the development machine before shipping the tree to a GPU")
    ap.add_argument("--find-commit", metavar="TREE_HASH",
                    help="name the commits whose source tree hash is TREE_HASH (from a report) and exit")
    ap.add_argument("--estimate", action="store_true",
                    help="print the modelled GPU time of each section (H100 and H200) and exit")
    return ap


class Saver:
    """Rewrites gpu_check.csv and gpu_check.md: after every section, at most every AUTOSAVE_S
    seconds while rows arrive, and once more from a timer just before the watchdog fires."""

    def __init__(self, R: Results):
        self.R, self.last, self.lock = R, 0.0, threading.Lock()

    def save(self, force: bool = False) -> None:
        from .report import write_csv, write_md

        now = time.monotonic()
        if not force and now - self.last < AUTOSAVE_S:
            return
        if not self.lock.acquire(timeout=5):
            return
        try:
            self.last = now
            write_csv(self.R)
            write_md(self.R, self.R.elapsed())
        except Exception as e:  # noqa: BLE001 - a report error must not end the run
            print(f"[run] could not write the report: {type(e).__name__}: {e}", flush=True)
        finally:
            self.lock.release()


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.stamp or args.find_commit:
        from .provenance import cli

        return cli(["--stamp"] if args.stamp else ["--find-commit", args.find_commit])
    if args.estimate:
        from .estimate import print_estimates

        print_estimates()
        return 0
    wanted = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        print(f"bench.gpu_check: unknown section(s) {unknown}; choose from {SECTION_HELP}", file=sys.stderr)
        return 2
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        os.environ["LG_TEST_DEVICE"] = "cpu"
    else:
        os.environ["LG_TEST_DEVICE"] = "cuda"
    import tests.conftest  # noqa: F401  the interpreter speed-up of the test suite (dry run)

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
    R = Results(P, out)
    R.meta = _meta(P, run_id)
    saver = Saver(R)
    final_save = threading.Timer(max(1.0, P.hard_limit_s - 8), lambda: saver.save(force=True))
    final_save.daemon = True
    final_save.start()
    print(f"bench.gpu_check {run_id} -> {out}\n  {R.meta['gpu']}; torch {R.meta['torch']} (CUDA {R.meta['cuda']}), "
          f"triton {R.meta['triton']}; timer: {P.timer}\n  code: {R.meta['commit']}; tree {R.meta['tree_hash']}",
          flush=True)
    add0 = R.add

    def add_and_save(*a, **k):
        row = add0(*a, **k)
        saver.save()
        return row

    R.add = add_and_save  # type: ignore[method-assign]
    rc = _run_sections(P, R, wanted)
    final_save.cancel()
    return rc


def _run_sections(P: Plan, R: Results, wanted: List[str]) -> int:
    from . import capture, correct, device, hidden, report, rows, timing
    from .device import measure_copy

    deadline = R.t_start + P.deadline_s
    handles: Dict[str, object] = {}
    if "timing" in wanted:
        try:
            handles["traffic"] = timing.start_traffic(P, R)
        except Exception as e:  # noqa: BLE001
            fail(R, "timing", "byte model count (start)", e)
    funcs: Dict[str, Callable] = {
        "device": device.run, "correct": correct.run, "compile": capture.run_compile, "graph": capture.run_graph,
        "timing": lambda P_, R_, b: timing.run(P_, R_, b, handles.get("traffic")), "hidden": hidden.run,
        "rows": rows.run}

    def finish_pytest() -> None:
        h = handles.pop("pytest", None)
        if h is not None:
            correct.finish_pytest(P, R, h, handles["pytest_deadline"] - time.monotonic())

    for name in SECTIONS:
        if name not in wanted:
            continue
        if name in ("graph", "timing", "hidden", "rows"):
            finish_pytest()  # nothing is timed while the test files run on the same GPU
        if name == "correct":  # after the copy bandwidth is measured, alongside the correctness checks
            try:
                handles["pytest"] = correct.start_pytest(P, R)
                handles["pytest_deadline"] = time.monotonic() + P.budgets["pytest"]
            except Exception as e:  # noqa: BLE001
                fail(R, "correct", "pytest (start)", e)
        budget = Budget(P.budgets[name], deadline=deadline)
        t0 = time.monotonic()
        print(f"\n=== {name} (budget {P.budgets[name]:.0f} s, {budget.left():.0f} s left before the deadline) ===",
              flush=True)
        try:
            if name in ("graph", "timing", "hidden", "rows") and R.copy_bw is None and P.device == "cuda":
                R.copy_bw = measure_copy(P)[0]
            funcs[name](P, R, budget)
        except Exception as e:  # noqa: BLE001
            fail(R, name, f"section {name}", e)
        R.add("run", f"section {name}", "INFO", value=f"{time.monotonic() - t0:.1f}", unit="s",
              detail=f"budget {P.budgets[name]:.0f} s")
        free(P.device)
        report.write_csv(R)
        report.write_md(R, R.elapsed())
    finish_pytest()
    wall = R.elapsed()
    R.add("run", "total wall time", "INFO", value=f"{wall:.1f}", unit="s")
    csv_path, md_path = report.write_csv(R), report.write_md(R, wall)
    try:
        why = report.write_png(R)
    except Exception as e:  # noqa: BLE001
        why = f"{type(e).__name__}: {e}"
    faulthandler.cancel_dump_traceback_later()
    print("\n" + report.summary_table(R))
    plot = f"; no plot: {why}" if why else f", {os.path.join(R.out, 'gpu_check.png')}"
    print(f"\nwrote {csv_path}, {md_path}" + plot)
    fails = R.count("FAIL")
    print(f"{R.count('PASS')} passed, {fails} failed, {R.count('ERROR')} peer errors, {R.count('SKIP')} skipped; "
          f"total wall time {wall:.0f} s")
    return 1 if fails else 0
