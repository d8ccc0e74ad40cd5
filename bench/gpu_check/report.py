"""Section 8, the report: gpu_check.csv (one row per check or measurement), gpu_check.md (issue
20's targets first, each met / missed with the measured figure, then every row by section),
gpu_check.png (time and memory per provider and shape), and the console summary. The CSV and
the Markdown are rewritten after every section, so a run cut short keeps what it measured."""

from __future__ import annotations

import csv
import os
import re
from typing import Dict, List, Optional

from .common import COLUMNS, GiB, SECTIONS, Results

TIMING_GRID_NOTE = "N in {2048, 16 384, 65 536 where memory allows} x V in {32 000, 151 936}"
PROFILE_KEY = "profiles"


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def _md(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def write_csv(R: Results) -> str:
    path = os.path.join(R.out, "gpu_check.csv")
    meta = {k: R.meta.get(k) for k in ("run_id", "gpu", "torch", "cuda", "triton", "liger_kernel", "trl", "code")}
    meta["timer"] = R.plan.timer
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in R.rows:
            full = {**meta, **r}
            w.writerow([_fmt(full.get(c)) for c in COLUMNS])
    os.replace(path + ".tmp", path)
    return path


# ------------------------------------------------------------------------------------------
# issue 20's targets, judged from the rows
# ------------------------------------------------------------------------------------------
def _ok(R: Results, section: str, provider: str, N: int, V: int) -> Optional[dict]:
    return next((r for r in R.rows if r["section"] == section and r["status"] == "OK" and r.get("provider") == provider
                 and r.get("N") == N and r.get("V") == V), None)


def _verdict(flags: List[bool]) -> str:
    if not flags:
        return "not measured"
    return "met" if all(flags) else "missed"


def targets(R: Results) -> List[Dict[str, str]]:
    P = R.plan
    out: List[Dict[str, str]] = []
    dry = " (dry run: CPU interpreter, tiny sizes; no meaning for a GPU)" if P.dry else ""

    def add(tid: str, target: str, status: str, figure: str) -> None:
        mark = dry and tid[0] in "134" and "dry run" not in status
        out.append({"id": tid, "target": target, "status": status + (dry if mark else ""),
                    "figure": figure})

    shapes = [(B * T, V) for B, T, V in P.timing]
    # 1a: fused <= Liger at every shape
    flags, figs = [], []
    for N, V in shapes:
        a, b = _ok(R, "timing", "ours_triton_fused", N, V), _ok(R, "timing", "liger_triton", N, V)
        if a and b:
            ratio = a["median_ms"] / b["median_ms"]
            flags.append(ratio <= 1.0)
            figs.append(f"N={N} V={V}: {a['median_ms']:.3f} vs {b['median_ms']:.3f} ms ({ratio:.2f}x)")
        else:
            figs.append(f"N={N} V={V}: not both measured")
    status = _verdict(flags)
    if status == "met" and len(flags) < len(shapes):
        status = "met where measured"
    add("1a", "logits route, fused schedule: at most Liger's triton_grpo_loss time at every shape of the grid (" +
        TIMING_GRID_NOTE + ")", status, "; ".join(figs))
    # 1b, 1c: % of copy bandwidth at N = 16 384, V = 151 936
    for tid, prov, goal, what in (("1b", "ours_triton_fused", 0.85, "fused schedule"),
                                  ("1c", "ours_triton_2pass", 0.80, "two-pass schedule (lambda-GRPO + trace)")):
        r = _ok(R, "timing", prov, 16384, 151936)
        if r is None:  # the dry run: the largest timed shape
            cands = [x for x in R.rows
                     if x["section"] == "timing" and x["status"] == "OK" and x.get("provider") == prov]
            r = max(cands, key=lambda x: (x["N"], x["V"])) if cands else None
        if r is None or r.get("frac_copy_bw") is None:
            add(tid, f"{what}: >= {100 * goal:.0f}% of the measured copy bandwidth at N = 16 384, V = 151 936 "
                     "(byte model: a valid row read twice, dlogits written once)", "not measured", "")
            continue
        fig = (f"N={r['N']} V={r['V']}: {r['median_ms']:.3f} ms, {_pct(r['frac_copy_bw'])} of copy bandwidth "
               f"({r['gbps']:.0f} GB/s of {R.meta.get('copy_gbps', '?')}) by the byte model; "
               f"{_pct(r.get('frac_floor'))} by the floor (valid rows read once)")
        add(tid, f"{what}: >= {100 * goal:.0f}% of the measured copy bandwidth at N = 16 384, V = 151 936 (byte "
                 "model: a valid row read twice, dlogits written once)",
            "met" if r["frac_copy_bw"] >= goal else "missed", fig)
    # 1d: in place no slower than out of place
    flags, figs = [], []
    for N, V in shapes:
        for sched, a_name, b_name in (("fused", "ours_triton_fused_inplace", "ours_triton_fused"),
                                      ("two-pass", "ours_triton_2pass_inplace", "ours_triton_2pass")):
            a, b = _ok(R, "timing", a_name, N, V), _ok(R, "timing", b_name, N, V)
            if a and b:
                ratio = a["median_ms"] / b["median_ms"]
                flags.append(ratio <= 1.03)
                figs.append(f"{sched} N={N} V={V}: {a['median_ms']:.3f} vs {b['median_ms']:.3f} ms ({ratio:.2f}x)")
    why = inplace_reason(R)
    add("1d", "in place no slower than out of place (3% noise allowed), or the measured reason", _verdict(flags),
        "; ".join(figs) + (f". Profile: {why}" if why else ""))
    # 2: long rows
    rows = [r for r in R.rows if r["section"] == "correct" and str(r["name"]).startswith("long row")]
    T = max((r.get("T") or 0 for r in rows), default=0)
    n_pass, n_fail = sum(r["status"] == "PASS" for r in rows), sum(r["status"] == "FAIL" for r in rows)
    add("2", "long rows: one row of >= 65 536 tokens runs and is correct",
        ("met" if T >= 65536 else "met at a small T only") if rows and not n_fail else
        "missed" if n_fail else "not measured",
        "" if not rows else f"T = {T}: {n_pass} checks passed, {n_fail} failed" +
        ("; " + "; ".join(r["name"] + ": " + str(r.get("detail", ""))[:120] for r in rows if r["status"] == "FAIL")
         if n_fail else ""))
    # 3: CUDA graph
    g = [r for r in R.rows if r["section"] == "graph"]
    cap = [r for r in g if "captured in a CUDA graph" in r["name"]]
    rep = [r for r in g if ": replay," in r["name"]]
    times = {r["name"]: r["median_ms"] for r in g if r["status"] == "OK"}
    liger = _ok(R, "timing", "liger_triton", P.graph_shape[0] * P.graph_shape[1], P.graph_shape[2])
    fig = "; ".join(f"{k.replace(' time', '')}: {v:.3f} ms" for k, v in times.items())
    if liger:
        fig += f"; Liger's eager step at the same shape: {liger['median_ms']:.3f} ms"
    syncs = [f"{r['name'].split(':')[0]}: {r['value']} host syncs" for r in g if "host syncs" in r["name"]]
    if P.dry:
        status = "not measured (dry run: no CUDA graphs)"
    elif not cap:
        status = "not measured"
    else:
        ok = all(r["status"] == "PASS" for r in cap + rep) and len(rep) > 0
        status = "met" if ok else "missed"
    add("3", "capturable: a fwd+bwd step in a CUDA graph replays correctly with new advantages, lambda and masks; its "
             "small-N time", status, "; ".join(syncs) + ("; " if syncs and fig else "") + fig)
    # 4: hidden route
    hid = R.extra.get("hidden", {})
    flags, figs = [], []
    for B, T_, H, V in P.hidden_timing:
        N = B * T_
        ours, lig, fl = hid.get((N, H, "ours_fused_linear")), hid.get((N, H, "liger_fused_linear")), \
            hid.get((N, H, "floor_valid"))
        if not ours:
            continue
        bits = [f"N={N} H={H}: ours {ours[0] * 1e3:.2f} ms, {ours[1] / GiB:.2f} GiB"]
        if fl:
            flags.append(ours[0] <= 1.15 * fl[0])
            bits.append(f"{ours[0] / fl[0]:.2f}x the floor ({fl[0] * 1e3:.2f} ms)")
        if lig:
            flags += [ours[0] <= lig[0], ours[1] <= lig[1]]
            bits.append(f"Liger {lig[0] * 1e3:.2f} ms, {lig[1] / GiB:.2f} GiB")
        trl = hid.get((N, H, "trl_chunked_head"))
        if trl:
            bits.append(f"TRL head {trl[0] * 1e3:.2f} ms, {trl[1] / GiB:.2f} GiB")
        figs.append(", ".join(bits))
    add("4", "hidden-state route: fused_linear_grpo_loss fwd+bwd <= 1.15x the floor of the three matmuls, at most "
             "Liger's time and peak memory (N in {4096, 16 384} x H in {896, 2048}, V = 151 936)", _verdict(flags),
        "; ".join(figs))
    # 5: correct on the card
    rows = [r for r in R.rows if r["status"] in ("PASS", "FAIL") and (
        r["section"] == "correct" or (r["section"] == "hidden" and "vs float64" in r["name"]))]
    fails = [r for r in rows if r["status"] == "FAIL"]
    kinds = []
    for key, label in (("cispo", "cispo"), ("cispo_two_sided", "cispo_two_sided"), ("sapo", "sapo"),
                       ("vespo", "vespo"), ("gspo", "GSPO"), ("packed", "packed"),
                       ("fused_linear_grpo_loss", "hidden route"), ("dapo_fused", "clip (dapo)"),
                       ("pytest", "pytest on the card")):
        sel = [r for r in rows if re.search(rf"(^|[^\w]){key}([^\w]|$)", r["name"])]
        if sel:
            kinds.append(f"{label} {sum(r['status'] == 'PASS' for r in sel)}/{len(sel)}")
    add("5", "correct on the card: every surrogate, GSPO, packed inputs and the hidden route against the float64 "
             "reference with the project's rule (scalars: plain torch's worst over the inputs and one-ulp moves)",
        "not measured" if not rows else "met" if not fails else "missed",
        "" if not rows else f"{len(rows) - len(fails)} of {len(rows)} checks passed ({', '.join(kinds)})" +
        ("; failed: " + "; ".join(f"{r['name']} [{r.get('provider', '')}] N={r.get('N')} V={r.get('V')}"
                                  for r in fails[:8]) if fails else ""))
    return out


def inplace_reason(R: Results) -> str:
    """From the profiles of one step each: kernel time in and out of place and what differs."""
    prof = R.extra.get(PROFILE_KEY, {})
    bits = []
    for sched, a_name, b_name in (("fused", "ours_triton_fused_inplace", "ours_triton_fused"),
                                  ("two-pass", "ours_triton_2pass_inplace", "ours_triton_2pass")):
        a, b = prof.get(a_name), prof.get(b_name)
        if not a or not b:
            continue
        ka = {n: us for n, us, _ in a["kernels"]}
        kb = {n: us for n, us, _ in b["kernels"]}
        diffs = sorted(((n, (ka.get(n, 0) - kb.get(n, 0)) / 1e3) for n in set(ka) | set(kb)), key=lambda x: -abs(x[1]))
        N, V = R.plan.profile_shape[0] * R.plan.profile_shape[1], R.plan.profile_shape[2]
        sa, sb = R.timing.get((N, V, a_name)), R.timing.get((N, V, b_name))
        step = f"step {sa * 1e3:.3f} vs {sb * 1e3:.3f} ms, " if sa and sb else ""
        bits.append(f"{sched} N={N} V={V}: {step}kernels {a['total_ms']:.3f} vs {b['total_ms']:.3f} ms; largest "
                    "differences: " + ", ".join(f"{n[:50]} {d:+.3f} ms" for n, d in diffs[:3] if abs(d) > 0))
    return "; ".join(bits)


# ------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------
def write_md(R: Results, wall_s: float) -> str:
    path = os.path.join(R.out, "gpu_check.md")
    m = R.meta
    L = [f"# GPU check {m.get('run_id')}", "",
         f"- machine: {m.get('gpu')}; {m.get('cores')} CPU cores; python {m.get('python')}",
         f"- torch {m.get('torch')} (CUDA {m.get('cuda')}), triton {m.get('triton')}, liger-kernel "
         f"{m.get('liger_kernel')}, trl {m.get('trl')}, transformers {m.get('transformers')}",
         f"- code under test: {m.get('commit')}; source tree hash {m.get('tree_hash')} "
         f"({m.get('tree_files')} files); git HEAD here: {m.get('git_head_here')}",
         f"- TRITON_INTERPRET={m.get('triton_interpret')}; timer: {R.plan.timer}; memory: {R.plan.memory}",
         f"- measured copy bandwidth: {m.get('copy_gbps', '?')} GB/s (read + write)",
         f"- rows: {len(R.rows)}: {R.count('PASS')} PASS, {R.count('FAIL')} FAIL, {R.count('ERROR')} ERROR, "
         f"{R.count('SKIP')} SKIP; wall time {wall_s:.0f} s", ""]
    if R.plan.dry:
        L += ["**Dry run**: CPU, Triton interpreter, tiny sizes. Times and memory say nothing about a GPU.", ""]
    L += ["## Targets (issue 20)", "", "| # | target | status | measured |", "|---|---|---|---|"]
    for t in targets(R):
        L.append(f"| {t['id']} | {_md(t['target'])} | **{t['status']}** | {_md(t['figure'])} |")
    L.append("")
    for s in SECTIONS + ("run",):
        rows = [r for r in R.rows if r["section"] == s]
        if not rows and s not in R.notes:
            continue
        L += [f"## {s}", ""]
        L += [f"- {_md(n)}" for n in R.notes.get(s, [])]
        if R.notes.get(s):
            L.append("")
        if s == "timing":
            L += ["| N | V | provider | status | median ms (min-max, n) | GB/s (model) | % copy BW (model) | "
                  "% copy BW (floor) | peak extra GiB | x dlogits | note |",
                  "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
            for r in rows:
                if r["status"] == "OK" and r.get("peak_mem_bytes") is not None:
                    gbps = "" if r.get("gbps") is None else f"{r['gbps']:.0f}"
                    L.append(f"| {r.get('N')} | {r.get('V')} | {r['name']} | OK | {r['median_ms']:.3f} "
                             f"({r['min_ms']:.3f}-{r['max_ms']:.3f}, {r['repeats']}) | {gbps} | "
                             f"{_pct(r.get('frac_copy_bw'))} | {_pct(r.get('frac_floor'))} | "
                             f"{r['peak_mem_bytes'] / GiB:.2f} | {r['peak_x_dlogits']:.2f} | |")
                else:
                    val = f"{r['value']} {r.get('unit', '')}" if r.get("value") is not None else ""
                    L.append(f"| {r.get('N', '')} | {r.get('V', '')} | {r['name']} | {r['status']} | {_md(val)} | | | "
                             f"| | | {_md(r.get('detail', ''))} |")
        elif s == "hidden":
            L += ["| N | H | provider | status | median ms (min-max, n) | x floor | peak extra GiB | err / allowed | "
                  "note |", "|---:|---:|---|---|---:|---:|---:|---|---|"]
            for r in rows:
                t = f"{r['median_ms']:.3f} ({r['min_ms']:.3f}-{r['max_ms']:.3f}, {r['repeats']})" \
                    if r.get("median_ms") is not None else ""
                xf = f"{r['value']}" if r.get("unit") == "x floor" else ""
                pk = f"{r['peak_mem_bytes'] / GiB:.2f}" if r.get("peak_mem_bytes") is not None else ""
                ea = f"{r['err']:.3g} / {r['allowed']:.3g}" if r.get("err") is not None else ""
                L.append(f"| {r.get('N', '')} | {r.get('H', '')} | {_md(r['name'])} | {r['status']} | {t} | {xf} | "
                         f"{pk} | {ea} | {_md(r.get('detail', ''))} |")
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
                    val += f" {r['peak_mem_bytes'] / GiB:.3f} GiB"
                    if r.get("peak_x_dlogits") is not None:
                        val += f" ({r['peak_x_dlogits']:.2f} x dlogits)"
                ea = f"{r['err']:.3g} / {r['allowed']:.3g}" if r.get("err") is not None else ""
                L.append(f"| {_md(r['name'])} | {r.get('provider', '')} | {r['status']} | {shape} | {_md(val)} | "
                         f"{ea} | {_md(r.get('detail', ''))} |")
        L.append("")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(L) + "\n")
    os.replace(path + ".tmp", path)
    return path


# ------------------------------------------------------------------------------------------
# plot
# ------------------------------------------------------------------------------------------
def write_png(R: Results) -> Optional[str]:
    """None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not importable ({e})"
    panels = []
    tim = [r for r in R.rows
           if r["section"] == "timing" and r["status"] == "OK" and r.get("peak_x_dlogits") is not None]
    for N, V in sorted({(r["N"], r["V"]) for r in tim}):
        sel = [r for r in tim if r["N"] == N and r["V"] == V]
        panels.append((f"logits route N={N}, V={V}, bf16", sel, [r["peak_x_dlogits"] for r in sel],
                       "peak extra memory, x one dlogits buffer", 1.0))
    hid = [r for r in R.rows if r["section"] == "hidden" and r["status"] == "OK" and r.get("median_ms") is not None]
    for N, H in sorted({(r["N"], r["H"]) for r in hid}):
        sel = [r for r in hid if r["N"] == N and r["H"] == H]
        panels.append((f"hidden route N={N}, H={H}, V={sel[0]['V']}, bf16", sel,
                       [(r.get("peak_mem_bytes") or 0) / GiB for r in sel], "peak extra memory, GiB", None))
    if not panels:
        return "nothing timed"
    fig, axes = plt.subplots(len(panels), 2, figsize=(15, 2.2 + 2.0 * len(panels)), squeeze=False)
    for i, (title, sel, mem, mem_label, line) in enumerate(panels):
        y = list(range(len(sel)))
        med = [r["median_ms"] for r in sel]
        err = [[m - r["min_ms"] for m, r in zip(med, sel)], [r["max_ms"] - m for m, r in zip(med, sel)]]
        colors = ["tab:blue" if str(r.get("provider", "")).startswith("ours") else
                  "tab:green" if str(r.get("provider", "")).startswith("floor") else "tab:gray" for r in sel]
        ax = axes[i][0]
        ax.barh(y, med, xerr=err, color=colors, capsize=3)
        ax.set_yticks(y)
        ax.set_yticklabels([r["name"][:60] for r in sel], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("fwd+bwd ms (median; bars min-max)")
        ax.set_title(title, fontsize=9)
        for yy, r in zip(y, sel):
            if r.get("frac_copy_bw") is not None:
                ax.text(r["median_ms"], yy, f"  {100 * r['frac_copy_bw']:.0f}% copy BW (model)", va="center",
                        fontsize=7)
            elif r.get("unit") == "x floor":
                ax.text(r["median_ms"], yy, f"  {r['value']}x floor", va="center", fontsize=7)
        ax2 = axes[i][1]
        ax2.barh(y, mem, color=colors)
        ax2.set_yticks(y)
        ax2.set_yticklabels([])
        ax2.invert_yaxis()
        if line:
            ax2.axvline(line, color="k", ls="--", lw=1)
        ax2.set_xlabel(mem_label)
    fig.suptitle(f"lambda-grpo GPU check {R.meta.get('run_id')}: {R.meta.get('gpu')}; code {R.meta.get('code')}\n"
                 f"timer: {R.plan.timer}; copy bandwidth {R.meta.get('copy_gbps', '?')} GB/s", fontsize=9)
    fig.tight_layout()
    path = os.path.join(R.out, "gpu_check.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------------------
# console
# ------------------------------------------------------------------------------------------
def summary_table(R: Results) -> str:
    out = [f"{'section':<8} {'status':<6} item"]
    for r in R.rows:
        s = r["section"]
        if s == "device" and r["status"] == "INFO":
            continue
        if s in ("correct", "compile", "graph", "hidden") and r["status"] == "PASS" and \
                not r["name"].startswith("pytest"):
            continue  # counted below; every row is in gpu_check.md
        if s == "rows" and r["status"] == "OK":
            continue  # the ratio rows carry the comparison
        item = r["name"] + (f" [{r['provider']}]" if r.get("provider") else "")
        if r.get("B"):
            item += f" N={r['N']} V={r.get('V', '-')}" + (f" H={r['H']}" if r.get("H") else "")
        if r.get("median_ms") is not None:
            item += f": {r['median_ms']:.3f} ms"
            if r.get("frac_copy_bw") is not None:
                item += f", {100 * r['frac_copy_bw']:.0f}% copy BW (model)"
            if r.get("peak_x_dlogits") is not None:
                item += f", mem {r['peak_x_dlogits']:.2f}x dlogits"
        elif r.get("value") is not None:
            item += f": {r['value']} {r.get('unit', '')}".rstrip()
        if r["status"] in ("FAIL", "ERROR", "SKIP") and r.get("detail"):
            item += f" -- {str(r['detail'])[:140]}"
        out.append(f"{s:<8} {r['status']:<6} {item}")
    for sec in ("correct", "compile", "graph", "hidden"):
        n_pass = sum(r["status"] == "PASS" and r["section"] == sec for r in R.rows)
        out.append(f"{sec:<8} {'PASS':<6} {n_pass} {sec} checks passed (each one is in gpu_check.md)")
    out.append("")
    out.append("targets (issue 20):")
    for t in targets(R):
        out.append(f"  {t['id']:<3} {t['status']:<12} {t['target'][:70]}")
        if t["figure"]:
            out.append(f"      {t['figure'][:400]}")
    return "\n".join(out)
