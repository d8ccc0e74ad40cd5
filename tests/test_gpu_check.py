"""`python -m bench.gpu_check --dry-run`: the GPU acceptance run's code path on the CPU, and the
parts of the GPU check that need no kernels at all.

The dry run executes every section (device facts, correctness against the float64 reference,
torch.compile, the CUDA-graph step's plumbing, timing against the peers, the hidden-state route,
row math) under TRITON_INTERPRET=1 at tiny sizes, skipping only what needs CUDA. No timing is
asserted: only that it finishes, writes its outputs, reports no FAIL, checks the byte model of
bench/gpu_model.py against the kernels, and judges issue 20's targets. It takes about 2 minutes
on a 2-core machine (docs/gpu.md).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = {"device", "correct", "compile", "graph", "timing", "hidden", "rows"}


@pytest.mark.triton
def test_dry_run_writes_outputs_without_failures(tmp_path):
    out = tmp_path / "gpu_check"
    env = {k: v for k, v in os.environ.items() if k not in ("LG_TEST_DEVICE",)}
    res = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=420)
    tail = f"exit {res.returncode}\nstdout:\n{res.stdout[-4000:]}\nstderr:\n{res.stderr[-3000:]}"
    assert res.returncode == 0, tail
    for name in ("gpu_check.csv", "gpu_check.md"):
        assert (out / name).is_file(), tail
    with open(out / "gpu_check.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    sections = {r["section"] for r in rows}
    assert SECTIONS <= sections, sorted(sections)
    assert not [r for r in rows if r["status"] == "FAIL"], [r["name"] for r in rows if r["status"] == "FAIL"]
    # every section produced something besides skips, and the correctness checks really ran
    for s in SECTIONS - {"device"}:
        assert any(r["section"] == s and r["status"] in ("PASS", "OK") for r in rows), s
    assert sum(r["section"] == "correct" and r["status"] == "PASS" for r in rows) >= 40
    names = " ".join(r["name"] for r in rows if r["status"] == "PASS")
    for what in ("cispo_two_sided", "sapo", "vespo", "gspo", "packed", "long row", "fused_linear_grpo_loss",
                 "replay, new mask"):
        assert what in names, what
    # the byte model behind "% of copy bandwidth" agrees with what the kernels load and store
    model = [(r["name"], r["status"]) for r in rows if r["name"].startswith("byte model vs the kernels")]
    assert {s for _, s in model} <= {"PASS", "SKIP"} and sum(s == "PASS" for _, s in model) >= 4, model
    md = (out / "gpu_check.md").read_text()
    assert "## Targets (issue 20)" in md and "source tree hash" in md
    assert all(f"| {t} |" in md for t in ("1a", "1b", "1c", "1d", "2", "3", "4", "5"))


def test_tree_hash_names_the_code(tmp_path):
    from bench.gpu_check.provenance import counted, tree_hash

    assert counted("lambda_grpo/api.py") and counted("bench/gpu_check/main.py") and counted("Makefile")
    assert not counted("bench/results/x.py") and not counted("lambda_grpo/__pycache__/api.cpython-311.pyc")
    assert not counted("docs/gpu.md") and not counted("README.md")
    for p, text in (("lambda_grpo/a.py", "x = 1\n"), ("bench/b.py", "y = 2\n"), ("Makefile", "all:\n"),
                    ("docs/c.md", "ignored\n")):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_text(text)
    h, n = tree_hash(str(tmp_path))
    assert n == 3 and tree_hash(str(tmp_path)) == (h, 3)
    (tmp_path / "docs/c.md").write_text("changed, still ignored\n")
    assert tree_hash(str(tmp_path))[0] == h
    (tmp_path / "bench/b.py").write_text("y = 3\n")
    assert tree_hash(str(tmp_path))[0] != h


def test_find_commit_from_git_objects():
    from bench.gpu_check.provenance import _git, commit_tree_hash, find_commits

    head = _git("rev-parse", "HEAD")
    if not head:
        pytest.skip("not a git checkout")
    found = find_commits(commit_tree_hash("HEAD"), max_count=5)
    assert any(head.startswith(f.split()[0]) for f in found), (head, found)


def test_one_ulp_moves():
    from bench.gpu_check.common import ulp_moved

    x = torch.tensor([0.0, 1.0, -2.5, 3e-3]).to(torch.bfloat16)
    old = torch.tensor([-1.0, -2.0, 0.0, -3.0])
    moved = ulp_moved({"logits": x, "old_logp": old}, 0)
    up = moved["logits"]
    assert up.dtype == torch.float32  # the logits route moves at the precision of its fp32 math
    for a, b in ((x.float(), up), (old, moved["old_logp"])):
        nz = a != 0
        assert torch.equal(b[~nz], a[~nz])
        gap = (b[nz] - a[nz]).abs()
        ulp = (torch.nextafter(a[nz].abs(), torch.tensor(float("inf"))) - a[nz].abs())
        assert torch.all(gap > 0) and torch.all(gap <= ulp)
    own = ulp_moved({"hidden": x}, 1, keys=("hidden",), upcast=False)["hidden"]
    assert own.dtype == torch.bfloat16 and torch.all((own.view(torch.int16) - x.view(torch.int16)).abs()[1:] == 1)


def test_modelled_gpu_time_fits_eight_minutes():
    from bench.gpu_check.common import GPU_BUDGETS, gpu_plan
    from bench.gpu_check.estimate import CARDS, estimate

    for card in CARDS:
        est = estimate(card)
        assert sum(t for t, _ in est.values()) <= 0.6 * 480, (card, est)
        for s, (t, _) in est.items():
            assert s not in GPU_BUDGETS or t <= GPU_BUDGETS[s], (card, s, t)
    P = gpu_plan(total_memory=80 * 2**30)
    assert P.deadline_s + 15 <= P.hard_limit_s <= 480
