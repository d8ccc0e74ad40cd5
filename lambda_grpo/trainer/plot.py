"""PNG plots of the training curves (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence


def _smooth(values: Sequence[float], k: int) -> List[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-k:]
        out.append(sum(acc) / len(acc))
    return out


def plot_metrics(rows: List[Dict], path: Path, title: Optional[str] = None) -> Path:
    """Four panels: reward / train accuracy (+ held-out greedy accuracy), length, lambda, clip/entropy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "reward" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    steps = [r["step"] for r in train]
    k = max(1, len(train) // 10)
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    a = ax[0, 0]
    if train:
        a.plot(steps, [r["reward"] for r in train], alpha=0.3, color="C0")
        a.plot(steps, _smooth([r["reward"] for r in train], k), color="C0", label=f"train reward (mean of {k})")
    if evals:
        a.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", color="C3",
               label="held-out greedy accuracy")
    a.set_xlabel("step")
    a.set_ylim(-0.02, 1.02)
    a.legend(fontsize=8)
    a.set_title("reward / accuracy")
    a = ax[0, 1]
    if train:
        a.plot(steps, [r["completion_len"] for r in train], color="C1", label="mean")
        a.fill_between(steps, [r["completion_len_min"] for r in train], [r["completion_len_max"] for r in train],
                       color="C1", alpha=0.2, label="min-max")
    a.set_title("completion length (tokens)")
    a.set_xlabel("step")
    a.legend(fontsize=8)
    a = ax[1, 0]
    lam = [(r["step"], r["lambda"]) for r in train if r.get("lambda") is not None]
    if lam:
        a.plot([s for s, _ in lam], [v for _, v in lam], color="C2")
    else:
        a.text(0.5, 0.5, "no lambda (not lambda_grpo)", ha="center", va="center", transform=a.transAxes)
    a.set_title("lambda (lambda-GRPO)")
    a.set_xlabel("step")
    a = ax[1, 1]
    for key, color in (("clip_frac", "C4"), ("entropy_mean", "C5"), ("kl_mean", "C6")):
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if pts:
            a.plot([s for s, _ in pts], [v for _, v in pts], color=color, label=key)
    a.set_title("clip fraction / entropy / KL")
    a.set_xlabel("step")
    if a.lines:
        a.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
