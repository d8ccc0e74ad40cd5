"""`python -m bench.gpu_check --dry-run`: the GPU acceptance run's code path on the CPU.

The dry run executes every section (device facts, correctness against the float64 reference,
torch.compile, timing, row math) under TRITON_INTERPRET=1 at tiny sizes, skipping only what
needs CUDA. No timing is asserted: only that it finishes, writes its outputs and reports no FAIL.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.triton
def test_dry_run_writes_outputs_without_failures(tmp_path):
    out = tmp_path / "gpu_check"
    env = {k: v for k, v in os.environ.items() if k not in ("LG_TEST_DEVICE",)}
    res = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    tail = f"exit {res.returncode}\nstdout:\n{res.stdout[-4000:]}\nstderr:\n{res.stderr[-3000:]}"
    assert res.returncode == 0, tail
    for name in ("gpu_check.csv", "gpu_check.md"):
        assert (out / name).is_file(), tail
    with open(out / "gpu_check.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    sections = {r["section"] for r in rows}
    assert {"device", "correct", "compile", "timing", "rows"} <= sections, sorted(sections)
    assert not [r for r in rows if r["status"] == "FAIL"], [r["name"] for r in rows if r["status"] == "FAIL"]
    # every section produced something besides skips, and the correctness checks really ran
    for s in ("correct", "compile", "timing", "rows"):
        assert any(r["section"] == s and r["status"] in ("PASS", "OK") for r in rows), s
    assert sum(r["section"] == "correct" and r["status"] == "PASS" for r in rows) >= 20
