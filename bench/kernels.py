"""Kernel report: `python -m bench.kernels` — registers, shared memory and spills per kernel
specialisation, for sm_80 and sm_90, from `ptxas -v` on the PTX Triton generates.

Measured, not modelled: each specialisation the launchers can pick (lambda_grpo/kernels/_config.py) is
compiled ahead of time with `triton.compile(..., target=GPUTarget("cuda", cc, 32))` (no GPU
needed) and its PTX assembled by the ptxas shipped in the triton wheel. "smem" is the
dynamic shared memory Triton allocates (reductions / scans); ptxas' static smem is 0 for all.

Options: --strides D plain one (stride/V classes to list; default D, i.e. V % 16 == 0 as for
every real vocabulary; the others are summarised), --json (raw rows), --arch 80 90.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def _rerun_without_interpreter(argv) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.call([sys.executable, "-m", "bench.kernels", *argv], env=env)


def _table(rows, archs):
    by_key = {}
    for r in rows:
        key = (r["kernel"], r["dtype"] or "-", r["spec"], r["stride"], r["num_warps"])
        by_key.setdefault(key, {})[r["arch"]] = r
    head = ["kernel", "logits", "constexprs", "V/stride", "warps"]
    for a in archs:
        head += [f"{a} regs", f"{a} spill st/ld B", f"{a} smem B"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, per in by_key.items():
        cells = [str(k) for k in key]
        for a in archs:
            r = per.get(a)
            cells += ["-", "-", "-"] if r is None else [
                str(r["registers"]), f"{r['spill_stores']}/{r['spill_loads']}", str(r["shared"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return _rerun_without_interpreter(argv)
    ap = argparse.ArgumentParser(description="ptxas register/spill report for the lambda_grpo Triton kernels")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--strides", nargs="+", default=["D"], choices=["D", "plain", "one"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import triton

    from lambda_grpo.kernels._aot import STRIDE_CLASSES, compile_all, ptxas_path

    rows = compile_all(tuple(args.arch))
    for r in rows:
        r.pop("ptxas")
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        return 0
    archs = [f"sm_{a}" for a in args.arch]
    shown = [r for r in rows if r["stride"] in ("-", *args.strides)]
    print(f"# lambda_grpo Triton kernels: ptxas -v (triton {triton.__version__})")
    for a in args.arch:
        ver = subprocess.run([ptxas_path(a), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        print(f"# sm_{a}: {ptxas_path(a)} ({ver[-2] if len(ver) >= 2 else '?'})")
    print()
    print(_table(shown, archs))
    print()
    for sc in STRIDE_CLASSES:
        sel = [r for r in rows if r["stride"] == sc]
        if sel and sc not in args.strides:
            print(f"V/stride class {sc!r} (not listed): {len(sel)} compilations, max registers "
                  f"{max(r['registers'] for r in sel)}, "
                  f"spill bytes {sum(r['spill_stores'] + r['spill_loads'] for r in sel)}")
    total = sum(r["spill_stores"] + r["spill_loads"] for r in rows)
    print(f"{len(rows)} compilations in all, total spill bytes {total}, max registers "
          f"{max(r['registers'] for r in rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
