"""CI for the benchmark suite: `python -m bench --quick` runs end to end, writes its CSV, and a
provider that disagrees with the float64 truth makes the run fail before timing.

No assert here depends on how fast the machine is: a quick run does a fixed amount of work
(every listed measurement, 3 timed repeats, no time budget), and the test checks what was
measured. The subprocess timeout is only a guard against a hang.
"""

import csv
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


HANG_GUARD_S = 3 * 3600


def _bench(args, tmp_path, env=None, timeout=HANG_GUARD_S):
    return subprocess.run([sys.executable, "-m", "bench", *args, "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_quick_run_exits_zero_and_writes_csv(tmp_path):
    proc = _bench(["--quick"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows, "empty CSV"
    assert rows[0]["git_commit"] and rows[0]["torch"] and rows[0]["cpu"], "machine/version columns missing"
    checks = [r for r in rows if r["kind"] == "check"]
    assert any(r["provider"] == "torch" and r["status"] == "ok" for r in checks), "torch backend not checked"
    assert not any(r["status"] in ("DISAGREES", "ERROR") for r in checks)
    timing = [r for r in rows if r["kind"] == "timing"]
    # no measurement was cut for time: skips have other reasons (not on this device, memory)
    assert not any("time budget" in (r.get("reason") or "") for r in timing), [r["reason"] for r in timing]
    timed = {(r["provider"], r["metric"]): float(r["value"]) for r in timing if r["status"] == "ok" and r["metric"]}
    assert timed.get(("floor", "exp_out_median"), 0) > 0
    assert timed.get(("torch", "fwdbwd_median"), 0) > 0
    assert timed.get(("torch", "peak_extra_fwdbwd"), 0) > 0
    # the fixed amount of work: every timing that ran has exactly 3 repeats, whatever the load
    counts = {k: v for k, v in timed.items() if k[1].endswith("_n")}
    assert counts and set(counts.values()) == {3.0}, counts
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
