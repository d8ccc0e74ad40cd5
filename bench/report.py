"""Outputs of a run: long-format CSV, Markdown tables, PNG plots."""

from __future__ import annotations

import csv
import math
from typing import Dict, List, Optional

from .cases import Case, hidden_memory_model

GiB = 1024**3
MiB = 1024**2


def derive(results: List[dict]) -> None:
    """Add floor ratios, speed-ups of ours and memory ratios to each measured result, in place.

    The floor of a case is the default-thread floor measured in that case if there is one (the
    same load as the case's providers), else one measured on the same logits in another case
    (same task, dtype, V and N: the inputs do not depend on the loss mode). A provider run with
    k threads ("name@kt") is divided by the floor run with k threads in its case when there is
    one ("floor@kt"). "Ours" for a provider run with k threads is our backend run with k
    threads, when measured."""
    floors: Dict[tuple, dict] = {}
    by_case: Dict[str, Dict[str, dict]] = {}
    for r in results:
        c = r["case"]
        if r["provider"] == "floor" and r["status"] == "ok":
            if c.task == "logits":  # the hidden task's floor depends on H too: its own case only
                floors.setdefault((c.task, c.dtype, c.V, c.N), r)
            floors[c.key()] = r
        elif r["provider"].startswith("floor@") and r["status"] == "ok":
            floors[(c.key(), r["provider"][len("floor"):])] = r
        by_case.setdefault(c.key(), {})[r["provider"]] = r
    for group in by_case.values():
        for name, r in group.items():
            if r["status"] != "ok" or name.startswith("floor"):
                continue
            case: Case = r["case"]
            d = r.setdefault("derived", {})
            floor = floors.get(case.key(), floors.get((case.task, case.dtype, case.V, case.N)))
            if "@" in name:
                floor = floors.get((case.key(), name[name.index("@"):]), floor)
            if floor is not None and case.task == "logits":
                exp_out = floor["exp_out"]["median"]
                d["x_floor2"] = r["fwdbwd"]["median"] / (2 * exp_out)
                d["x_floor2_alloc"] = r["fwdbwd"]["median"] / (exp_out + floor["exp_alloc"]["median"])
                d["fwd_x_floor1"] = r["fwd"]["median"] / exp_out
            if floor is not None and case.task == "hidden":
                d["x_mm_valid"] = r["fwdbwd"]["median"] / floor["mm_valid"]["median"]
                d["x_mm_all"] = r["fwdbwd"]["median"] / floor["mm_all"]["median"]
            if case.task == "hidden":
                d["mem_x_model"] = r["mem_fwdbwd"] / hidden_memory_model(case)["bytes"]
            suffix = name[name.index("@"):] if "@" in name else ""
            ours = None
            for cand in ("torch" + suffix, "fused_linear" + suffix):
                if group.get(cand, {}).get("status") == "ok":
                    ours = group[cand]
                    break
            if ours is not None and r is not ours:
                d["ours_speedup"] = r["fwdbwd"]["median"] / ours["fwdbwd"]["median"]
                d["ours_speedup_fwd"] = r["fwd"]["median"] / ours["fwd"]["median"]
            d["mem_x_dlogits"] = r["mem_fwdbwd"] / case.logits_bytes


def _metrics(r: dict) -> List[tuple]:
    out = []
    if r["provider"].startswith("floor") and "mm_all" in r:
        for v in ("all", "valid"):
            for part in ("", "_logits", "_dhidden", "_dW"):
                for s in ("median", "min", "max"):
                    out.append((f"mm_{v}{part}_{s}", r[f"mm_{v}{part}"][s], "s"))
            out.append((f"mm_{v}_n", r[f"mm_{v}"]["n"], "count"))
            out.append((f"mm_{v}_gflops", r[f"mm_{v}_gflops"], "GFLOP/s"))
        out.append(("n_valid", r["n_valid"], "count"))
        return out
    if r["provider"].startswith("floor"):
        for k in ("exp_alloc", "exp_out", "read_sum", "copy"):
            for s in ("median", "min", "max"):
                out.append((f"{k}_{s}", r[k][s], "s"))
            out.append((f"{k}_n", r[k]["n"], "count"))
        for k in ("gbps_read", "gbps_copy", "gbps_exp_out"):
            out.append((k, r[k], "GB/s"))
        return out
    for phase in ("fwd", "fwdbwd"):
        for s in ("median", "min", "max"):
            out.append((f"{phase}_{s}", r[phase][s], "s"))
        out.append((f"{phase}_n", r[phase]["n"], "count"))
    out += [("first_call", r["first_call_s"], "s"), ("peak_extra_fwd", r["mem_fwd"], "bytes"),
            ("peak_extra_fwdbwd", r["mem_fwdbwd"], "bytes"), ("peak_extra_first_call", r["mem_first_call"], "bytes")]
    for k, v in r.get("derived", {}).items():
        out.append((k, v, "ratio"))
    return out


def write_csv(path: str, meta: dict, results: List[dict], checks: List[dict]) -> None:
    meta_cols = list(meta.keys())
    cols = meta_cols + ["kind", "task", "mode", "dtype", "V", "N", "B", "T", "H", "provider", "provider_label",
                        "status", "reason", "loadavg_1m_at_case", "metric", "value", "unit"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)

        def row(kind, case: Case, provider, label, status, reason, load, metric, value, unit):
            w.writerow([meta[k] for k in meta_cols] + [kind, case.task, case.mode, case.dtype, case.V, case.N, case.B,
                                                       case.T, case.H, provider, label, status, reason, load, metric,
                                                       value, unit])

        for c in checks:
            if c["status"] in ("ok", "DISAGREES") and "errors" in c:
                for k, v in c["errors"].items():
                    row("check", c["case"], c["provider"], c.get("label", ""), c["status"], "", "",
                        f"rel_err_{k}", v, "ratio")
            else:
                row("check", c["case"], c["provider"], c.get("label", ""), c["status"], c.get("reason", ""), "",
                    "", "", "")
        for r in results:
            base = ("timing", r["case"], r["provider"], r.get("label", ""), r["status"], r.get("reason", ""),
                    r.get("loadavg_1m", ""))
            if r["status"] != "ok":
                row(*base, "", "", "")
                continue
            for metric, value, unit in _metrics(r):
                row(*base, metric, value, unit)


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.0f}" if x >= 0.1 else f"{x * 1e3:.1f}"


def _spread(st: dict) -> str:
    return f"{_ms(st['median'])} ({_ms(st['min'])}–{_ms(st['max'])}, n={st['n']})"


def _x(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def case_title(case: Case) -> str:
    extra = f", H={case.H}" if case.task == "hidden" else ""
    return (f"{case.task} · {case.mode} · {case.dtype} · V={case.V} · N={case.N} (B={case.B}, T={case.T}{extra}) · "
            f"one dlogits buffer = {case.logits_bytes / MiB:.0f} MiB")


def _hidden_floor_line(floor: dict, case: Case) -> str:
    def parts(v):
        return ", ".join(f"{k} {_ms(floor[f'mm_{v}_{k}']['median'])}" for k in ("logits", "dhidden", "dW"))

    m = hidden_memory_model(case)
    return (f"Floor (the three matmuls alone, `out=` into mapped buffers): all {case.N} tokens "
            f"{_spread(floor['mm_all'])} ms ({parts('all')}; {floor['mm_all_gflops']:.0f} GFLOP/s), the "
            f"{floor['n_valid']} valid tokens {_spread(floor['mm_valid'])} ms ({parts('valid')}). Memory model "
            f"(dW fp32 + dhidden + one chunk of {m['rows']} rows of fp32 logits): {m['bytes'] / MiB:.0f} MiB. "
            f"Load average at this case: {floor.get('loadavg_1m', '?')}.")


def markdown_case(results: List[dict]) -> List[str]:
    """Table of one case; results share the case."""
    case: Case = results[0]["case"]
    if case.task == "hidden":
        return _markdown_hidden_case(results)
    lines = [f"**{case_title(case)}**", ""]
    floor = next((r for r in results if r["provider"].startswith("floor") and r["status"] == "ok"), None)
    if floor:
        lines.append(
            f"Floor: exp pass {_ms(floor['exp_out']['median'])} ms with out= / {_ms(floor['exp_alloc']['median'])} ms "
            f"allocating; two-exp-pass floor {_ms(2 * floor['exp_out']['median'])} ms; read {floor['gbps_read']:.1f} "
            f"GB/s, copy {floor['gbps_copy']:.1f} GB/s (read+write). Load average at this case: "
            f"{floor.get('loadavg_1m', '?')}.")
        lines.append("")
    lines += ["| provider | fwd ms | fwd+bwd ms median (min–max, n) | × 2-exp floor | ours is × faster | "
              "peak extra MiB | × dlogits |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    skipped = []
    fused = False
    for r in results:
        if r["provider"].startswith("floor"):
            continue
        if r["status"] != "ok":
            skipped.append(f"{r['provider']}: {r['status']} — {r.get('reason', '')}")
            continue
        d = r.get("derived", {})
        # A provider whose backward costs < 5% of the step computes the gradient inside its forward.
        mark = " †" if r["fwdbwd"]["median"] - r["fwd"]["median"] < 0.05 * r["fwdbwd"]["median"] else ""
        fused = fused or bool(mark)
        lines.append(f"| {r['label']} | {_ms(r['fwd']['median'])}{mark} | {_spread(r['fwdbwd'])} | "
                     f"{_x(d.get('x_floor2'))} | {_x(d.get('ours_speedup'))} | {r['mem_fwdbwd'] / MiB:.0f} | "
                     f"{_x(d.get('mem_x_dlogits'))} |")
    if fused:
        lines += ["", "† the gradient is computed during the forward (one pass; backward only returns it), so the "
                      "forward time is the whole step."]
    if skipped:
        lines.append("")
        lines += [f"- not timed: {s}" for s in skipped]
    lines.append("")
    return lines


def _markdown_hidden_case(results: List[dict]) -> List[str]:
    case: Case = results[0]["case"]
    lines = [f"**{case_title(case)}**", ""]
    floor = next((r for r in results if r["provider"] == "floor" and r["status"] == "ok"), None)
    if floor:
        lines += [_hidden_floor_line(floor, case), ""]
    lines += ["| provider | fwd ms | fwd+bwd ms median (min–max, n) | × floor (valid tokens) | × floor (all N) | "
              "ours is × faster | peak extra MiB | × memory model | load |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    skipped = []
    for r in results:
        if r["provider"].startswith("floor"):
            continue
        if r["status"] != "ok":
            skipped.append(f"{r['provider']}: {r['status']} — {r.get('reason', '')}")
            continue
        d = r.get("derived", {})
        lines.append(f"| {r['label']} | {_ms(r['fwd']['median'])} | {_spread(r['fwdbwd'])} | "
                     f"{_x(d.get('x_mm_valid'))} | {_x(d.get('x_mm_all'))} | {_x(d.get('ours_speedup'))} | "
                     f"{r['mem_fwdbwd'] / MiB:.0f} | {_x(d.get('mem_x_model'))} | {r.get('loadavg_1m', '?')} |")
    notes = [f"- {r['provider']}: {n}" for r in results if r["status"] == "ok" for n in r.get("notes", [])]
    if notes or skipped:
        lines.append("")
    lines += notes
    lines += [f"- not timed: {s}" for s in skipped]
    lines.append("")
    return lines


HIDDEN_COLS = [("fused_linear", "ours"), ("torch_linear", "materialised logits + ours"), ("liger_chunked", "Liger"),
               ("trl_head", "TRL head + ours"), ("verl_head", "verl + ours")]


def hidden_targets(results: List[dict]) -> List[str]:
    """Issue 10, point 6: summary tables of the hidden task (one row per case) and each target."""
    cases: List[Case] = []
    for r in results:
        if r["case"].task == "hidden" and r["case"] not in cases:
            cases.append(r["case"])
    if not cases:
        return []

    def row(case, name):
        return next((r for r in results if r["case"] == case and r["provider"] == name), None)

    def cell(r):
        if r is None:
            return "not run"
        if r["status"] != "ok":
            return "skipped" if r["status"] == "skipped" else "error"
        st = r["fwdbwd"]
        return f"{_ms(st['median'])} ({_ms(st['min'])}–{_ms(st['max'])})"

    def shape(c):
        return f"V={c.V}, H={c.H}, N={c.N}"

    L = ["## Issue 10, point 6: from hidden states to the loss (fp32, grpo, forward + backward)", "",
         "Time, ms, median (min–max) of the timed repeats. Floor = the three LM-head matmuls alone "
         "(logits, dhidden, dW), `out=` into mapped buffers, over all N tokens and over the valid tokens "
         "(the rows our fused path computes; the others score every position).", "",
         "| shape | valid tokens | floor, all N | floor, valid | " + " | ".join(lbl for _, lbl in HIDDEN_COLS)
         + " | load |", "|---|---:|---:|---:|" + "---:|" * len(HIDDEN_COLS) + "---:|"]
    for c in cases:
        fl = row(c, "floor")
        ok = fl is not None and fl["status"] == "ok"
        fa = f"{_ms(fl['mm_all']['median'])} ({_ms(fl['mm_all']['min'])}–{_ms(fl['mm_all']['max'])})" if ok else "-"
        fv = (f"{_ms(fl['mm_valid']['median'])} ({_ms(fl['mm_valid']['min'])}–{_ms(fl['mm_valid']['max'])})"
              if ok else "-")
        loads = [r.get("loadavg_1m", "?") for r in results if r["case"] == c]
        L.append(f"| {shape(c)} | {fl['n_valid'] if ok else '-'} | {fa} | {fv} | "
                 + " | ".join(cell(row(c, n)) for n, _ in HIDDEN_COLS) + f" | {min(loads)}–{max(loads)} |")
    L += ["", "Peak extra memory, MiB (VmHWM over the baseline; gradients included). Memory model = dW (V×H fp32) + "
          "dhidden (N×H) + one chunk of our chunk size of fp32 logits, computed from the shapes (a model).", "",
          "| shape | memory model | " + " | ".join(lbl for _, lbl in HIDDEN_COLS) + " |",
          "|---|---:|" + "---:|" * len(HIDDEN_COLS)]
    for c in cases:
        m = hidden_memory_model(c)
        cells = []
        for n, _ in HIDDEN_COLS:
            r = row(c, n)
            cells.append(f"{r['mem_fwdbwd'] / MiB:.0f}" if r is not None and r["status"] == "ok" else "-")
        L.append(f"| {shape(c)} | {m['bytes'] / MiB:.0f} (chunk {m['rows']} rows) | " + " | ".join(cells) + " |")

    def verdict(ok):
        return "**met**" if ok else "**missed**"

    L += ["", "| shape | ours / floor (valid tokens), target ≤ 1.15 | ours / floor (all N) | ours peak / memory model, "
          "target ≤ 1.1 | Liger time / ours, target ≥ 1 | ours peak / Liger peak, target ≤ 1 |",
          "|---|---|---:|---|---|---|"]
    for c in cases:
        ours, liger = row(c, "fused_linear"), row(c, "liger_chunked")
        if ours is None or ours["status"] != "ok":
            L.append(f"| {shape(c)} | ours not measured: {'' if ours is None else ours.get('reason', '')} | | | | |")
            continue
        d = ours.get("derived", {})
        xv, xa, xm = d.get("x_mm_valid"), d.get("x_mm_all"), d.get("mem_x_model")
        t1 = "-" if xv is None else f"{xv:.2f} {verdict(xv <= 1.15)}"
        t2 = "-" if xa is None else f"{xa:.2f}"
        t3 = "-" if xm is None else f"{xm:.2f} {verdict(xm <= 1.1)}"
        if liger is not None and liger["status"] == "ok":
            sp = liger["fwdbwd"]["median"] / ours["fwdbwd"]["median"]
            mr = ours["mem_fwdbwd"] / max(liger["mem_fwdbwd"], 1)
            t4, t5 = f"{sp:.2f} {verdict(sp >= 1)}", f"{mr:.2f} {verdict(mr <= 1)}"
        else:
            t4 = t5 = "Liger not measured"
        L.append(f"| {shape(c)} | {t1} | {t2} | {t3} | {t4} | {t5} |")
    L.append("")
    return L


def plot(path: str, results: List[dict]) -> Optional[str]:
    """Time and peak memory vs N per provider (log-log), fp32 grpo at the largest and smallest V."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not importable ({e}); no plot"
    if any(r["case"].task == "hidden" for r in results) and not any(r["case"].task == "logits" for r in results):
        return plot_hidden(path, results, plt)
    sel = [r for r in results if r["case"].task == "logits" and r["case"].dtype == "fp32"
           and r["case"].mode == "grpo" and r["status"] == "ok"]
    vs = sorted({r["case"].V for r in sel}, reverse=True)
    vs = [v for v in vs if len({r["case"].N for r in sel if r["case"].V == v}) >= 2][:2]
    if not vs:
        return "fewer than two N per V measured; no plot"
    fig, axes = plt.subplots(2, len(vs), figsize=(max(8.0, 6.5 * len(vs)), 9), squeeze=False)
    styles = {"reference": ("tab:red", "o"), "eager_fp32": ("tab:orange", "s"), "compile_fp32": ("tab:purple", "D"),
              "trl": ("tab:brown", "^"), "torch": ("tab:blue", "*"), "triton": ("tab:cyan", "P"),
              "liger_triton": ("tab:olive", "v"), "liger_chunked": ("tab:pink", "X"),
              "torch_inplace": ("tab:green", "*")}
    for j, V in enumerate(vs):
        rows = [r for r in sel if r["case"].V == V]
        ax_t, ax_m = axes[0][j], axes[1][j]
        names = [n for n in styles if any(r["provider"] == n for r in rows)]
        names += [n + "@1t" for n in styles if any(r["provider"] == n + "@1t" for r in rows)]
        for n in names:
            pts = sorted((r["case"].N, r) for r in rows if r["provider"] == n)
            N = [p[0] for p in pts]
            med = [p[1]["fwdbwd"]["median"] for p in pts]
            lo = [m - p[1]["fwdbwd"]["min"] for m, p in zip(med, pts)]
            hi = [p[1]["fwdbwd"]["max"] - m for m, p in zip(med, pts)]
            c, mk = styles[n.split("@")[0]]
            ls = ":" if "@" in n else "-"
            label = pts[0][1]["label"]
            big = n.startswith("torch")
            ax_t.errorbar(N, med, yerr=[lo, hi], color=c, marker=mk, ms=8 if big else 6, ls=ls,
                          lw=2.5 if big else 1.3, capsize=3, label=label)
            if "@" not in n:  # memory does not depend on the thread count; one line per provider
                ax_m.plot(N, [p[1]["mem_fwdbwd"] / GiB for p in pts], color=c, marker=mk,
                          ms=8 if big else 6, lw=2.5 if big else 1.3, label=label)
        fl = sorted((r["case"].N, r) for r in rows if r["provider"] == "floor")
        if fl:
            ax_t.plot([p[0] for p in fl], [2 * p[1]["exp_out"]["median"] for p in fl], "k--", lw=1.5,
                      label="floor: two torch.exp passes (out=)")
        Ns = sorted({r["case"].N for r in rows})
        ax_m.plot(Ns, [N * V * 4 / GiB for N in Ns], "k--", lw=1.5, label="one dlogits buffer (N·V·4 B)")
        ax_m.plot(Ns, [1.25 * N * V * 4 / GiB for N in Ns], "k:", lw=1.2, label="target: 1.25 × dlogits")
        for ax, ylab in ((ax_t, "fwd+bwd time, s (median, bars: min–max)"), (ax_m, "peak extra RSS, GiB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N = B·T tokens")
            ax.set_ylabel(ylab)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xticks(Ns)
            ax.set_xticklabels([str(n) for n in Ns])
        ax_t.set_title(f"GRPO loss fwd+bwd, fp32, V={V}")
        ax_m.set_title(f"peak additional memory, fp32, V={V}")
        ax_t.legend(fontsize=7.5, loc="upper left")
        ax_m.legend(fontsize=7.5, loc="upper left")
    fig.suptitle("lambda-grpo benchmark, measured on this machine\n(CPU; each provider in its own process; "
                 "dotted: same provider with 1 intra-op thread)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def plot_hidden(path: str, results: List[dict], plt) -> Optional[str]:
    """The hidden task: per shape, each provider's fwd+bwd time over the valid-token matmul floor
    (bars: median, whiskers: min-max) and its peak extra memory over the memory model."""
    cases: List[Case] = []
    for r in results:
        if r["case"].task == "hidden" and r["case"] not in cases:
            cases.append(r["case"])
    floors = {r["case"]: r for r in results if r["provider"] == "floor" and r["status"] == "ok"}
    cases = [c for c in cases if c in floors]
    if not cases:
        return "no hidden-task case with a floor; no plot"
    names = [(n, lbl) for n, lbl in HIDDEN_COLS if any(r["provider"] == n and r["status"] == "ok" for r in results)]
    fig, (ax_t, ax_m) = plt.subplots(2, 1, figsize=(max(9.0, 1.6 * len(cases) + 3), 9))
    width = 0.8 / max(len(names), 1)
    colors = ["tab:blue", "tab:orange", "tab:pink", "tab:brown", "tab:green"]
    for j, (n, lbl) in enumerate(names):
        xs, med, lo, hi, mem = [], [], [], [], []
        for i, c in enumerate(cases):
            r = next((r for r in results if r["case"] == c and r["provider"] == n and r["status"] == "ok"), None)
            if r is None:
                continue
            f = floors[c]["mm_valid"]["median"]
            st = r["fwdbwd"]
            xs.append(i + (j - (len(names) - 1) / 2) * width)
            med.append(st["median"] / f)
            lo.append((st["median"] - st["min"]) / f)
            hi.append((st["max"] - st["median"]) / f)
            mem.append(r["mem_fwdbwd"] / hidden_memory_model(c)["bytes"])
        ax_t.bar(xs, med, width, yerr=[lo, hi], capsize=2, color=colors[j % len(colors)], label=lbl)
        ax_m.bar(xs, mem, width, color=colors[j % len(colors)], label=lbl)
    ax_t.axhline(1.15, color="k", ls="--", lw=1.2, label="target for ours: 1.15 x floor")
    ax_m.axhline(1.1, color="k", ls="--", lw=1.2, label="target for ours: 1.1 x model")
    labels = [f"V={c.V}\nH={c.H}\nN={c.N}" for c in cases]
    for ax, ylab in ((ax_t, "fwd+bwd time / three-matmul floor (valid tokens)"),
                     (ax_m, "peak extra memory / model (dW + dhidden + one chunk)")):
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel(ylab)
        ax.set_yscale("log")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper left")
    fig.suptitle("lambda-grpo benchmark, hidden states -> GRPO loss, fp32, measured on this machine (CPU)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
