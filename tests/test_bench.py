"""CI for the benchmark suite: `python -m bench --quick` runs end to end within 3 minutes, writes
its CSV, and a provider that disagrees with the float64 truth makes the run fail before timing."""

import csv
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(args, tmp_path, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "bench", *args, "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_quick_run_exits_zero_and_writes_csv(tmp_path):
    t0 = time.monotonic()
    proc = _bench(["--quick"], tmp_path)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert elapsed < 180, f"quick run took {elapsed:.0f} s (CI budget 180 s)"
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows, "empty CSV"
    assert rows[0]["git_commit"] and rows[0]["torch"] and rows[0]["cpu"], "machine/version columns missing"
    checks = [r for r in rows if r["kind"] == "check"]
    assert any(r["provider"] == "torch" and r["status"] == "ok" for r in checks), "torch backend not checked"
    assert not any(r["status"] in ("DISAGREES", "ERROR") for r in checks)
    timed = {(r["provider"], r["metric"]): float(r["value"]) for r in rows
             if r["kind"] == "timing" and r["status"] == "ok" and r["metric"]}
    assert timed.get(("floor", "exp_out_median"), 0) > 0
    assert timed.get(("torch", "fwdbwd_median"), 0) > 0
    assert timed.get(("torch", "peak_extra_fwdbwd"), 0) > 0
    assert (tmp_path / "report.md").exists()


def test_disagreeing_provider_fails_the_run(tmp_path):
    # BENCH_FAULT scales one provider's loss by 1.01: the check must catch it and exit non-zero.
    env = dict(os.environ, BENCH_FAULT="eager_fp32")
    proc = _bench(["--quick", "--check-only", "--providers", "eager_fp32"], tmp_path, env=env)
    assert proc.returncode != 0, proc.stdout[-4000:]
    assert "DISAGREES" in proc.stdout
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r["provider"] == "eager_fp32" and r["status"] == "DISAGREES" for r in rows)
