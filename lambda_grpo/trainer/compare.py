"""Side-by-side comparison: the same budget and seeds for GRPO, DAPO, lambda-GRPO and GRPO-lambda."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, List

from .config import COMPARE_METHODS, TrainConfig

log = logging.getLogger("lambda_grpo.trainer")


def run_comparison(base: TrainConfig, methods: List[str], seeds: List[int]) -> List[Dict]:
    """Train every (method, seed) from the same starting model; write compare.md/.json/.png in output_dir.

    Only the LossConfig changes between methods (COMPARE_METHODS); the rest of ``base`` (steps,
    prompts, lr, ...) is the shared budget. Returns one row per run.
    """
    from .loop import GRPOTrainer

    unknown = [m for m in methods if m not in COMPARE_METHODS]
    if unknown:
        raise ValueError(f"methods: expected names from {sorted(COMPARE_METHODS)}, got {unknown}")
    root = Path(base.output_dir)
    rows = []
    before: Dict[int, float] = {}  # per seed the starting model and held-out set are shared: evaluate once
    for seed in seeds:
        for name in methods:
            loss = base.loss.replace(aggregation="grpo", trace=None, adv_clamp_min=None, eps_high=base.loss.eps_low)
            loss = loss.replace(**COMPARE_METHODS[name])
            cfg = base.replace(loss=loss, seed=seed, output_dir=str(root / f"{name}-seed{seed}"), resume=None,
                               eval_before=seed not in before)
            log.info("compare: %s seed %d", name, seed)
            t0 = time.perf_counter()
            s = GRPOTrainer(cfg).train()
            if seed not in before:
                before[seed] = s.get("eval_before")
            rows.append(dict(method=name, seed=seed, eval_before=before[seed], eval_after=s.get("eval_after"),
                             eval_length_after=s.get("eval_length_after"), mean_train_len=s["mean_completion_len"],
                             final_lambda=s["final_lambda"], wall_time=time.perf_counter() - t0,
                             metrics=s["metrics"]))
            (root / "compare.json").write_text(json.dumps(rows, indent=2))
    table = comparison_table(rows, base)
    (root / "compare.md").write_text(table + "\n")
    plot_comparison(rows, root / "compare.png")
    print(table)
    print(f"\nplot: {root / 'compare.png'}")
    return rows


def comparison_table(rows: List[Dict], base: TrainConfig) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = (f"Budget: {base.steps} steps x {base.prompts_per_step} prompts x {base.group_size} completions, "
            f"max_new_tokens {base.max_new_tokens}, lr {base.lr}, {base.num_eval} held-out prompts (greedy).\n\n"
            "| method | seed | held-out acc before | after | train mean length | held-out length after "
            "| final λ | wall time (s) |\n"
            "|---|---|---|---|---|---|---|---|")
    body = [f"| {r['method']} | {r['seed']} | {f(r['eval_before'], '.3f')} | {f(r['eval_after'], '.3f')} | "
            f"{f(r['mean_train_len'], '.1f')} | {f(r['eval_length_after'], '.1f')} | {f(r['final_lambda'], '.4f')} | "
            f"{r['wall_time']:.0f} |" for r in rows]
    return "\n".join([head] + body)


def plot_comparison(rows: List[Dict], path: Path) -> Path:
    """Smoothed training reward per method (one line per run) and held-out accuracy after, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plot import _smooth

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({r["method"] for r in rows}, key=list(COMPARE_METHODS).index)
    for i, name in enumerate(names):
        for r in (r for r in rows if r["method"] == name):
            hist = [json.loads(line) for line in Path(r["metrics"]).read_text().splitlines()]
            train = [h for h in hist if "reward" in h]
            k = max(1, len(train) // 8)
            ax[0].plot([h["step"] for h in train], _smooth([h["reward"] for h in train], k), color=f"C{i}",
                       label=name if r["seed"] == rows[0]["seed"] else None)
        accs = [r["eval_after"] for r in rows if r["method"] == name and r["eval_after"] is not None]
        if accs:
            ax[1].bar(i, sum(accs) / len(accs), color=f"C{i}")
            ax[1].plot([i] * len(accs), accs, "k.")
    before = [r["eval_before"] for r in rows if r["eval_before"] is not None]
    if before:
        ax[1].axhline(sum(before) / len(before), color="gray", ls="--", label="before training")
        ax[1].legend(fontsize=8)
    ax[0].set_title("training reward (smoothed)")
    ax[0].set_xlabel("step")
    ax[0].legend(fontsize=8)
    ax[1].set_xticks(range(len(names)))
    ax[1].set_xticklabels(names, rotation=20, fontsize=8)
    ax[1].set_title("held-out greedy accuracy after training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
