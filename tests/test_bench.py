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


def test_hidden_grid_shapes_and_providers():
    from bench import grid

    checks, timed = grid.hidden()
    shapes = {(c.N, c.H, c.V) for c, _ in timed}
    assert shapes == {(N, H, V) for N in (2048, 4096) for H in (576, 896) for V in (49152, 151936)}
    assert all(c.task == "hidden" and c.dtype == "fp32" for c, _ in timed)
    for _, provs in timed:
        assert provs[:3] == ["floor", "fused_linear", "liger_chunked"]
        assert {"torch_linear", "trl_head", "verl_head"} <= set(provs)
    assert {(c.V, c.H) for c in checks} == {(V, H) for V in (49152, 151936) for H in (576, 896)}


def test_hidden_memory_model_and_targets_table():
    # the memory model is dW (fp32) + dhidden + one chunk of our chunk size; the targets table
    # reports every target (met or missed) from whatever was measured, and says what was not
    from bench import report
    from bench.cases import Case, hidden_memory_model
    from lambda_grpo._linear import chunk_rows
    import torch

    c = Case("hidden", 151936, 2048, "fp32", "grpo", H=896)
    m = hidden_memory_model(c)
    rows = chunk_rows(151936, 896, torch.device("cpu"))
    assert m["rows"] == rows
    assert m["bytes"] == 151936 * 896 * 4 + 2048 * 896 * 4 + rows * 151936 * 4

    def st(x):
        return {"median": x, "min": 0.9 * x, "max": 1.2 * x, "n": 3}

    floor = {"case": c, "provider": "floor", "status": "ok", "mm_all": st(10.0), "mm_valid": st(6.0),
             "n_valid": 1280, "loadavg_1m": "1.0", "mm_all_gflops": 80.0}
    for v, t in (("all", 10.0), ("valid", 6.0)):
        floor.update({f"mm_{v}_{k}": st(t / 3) for k in ("logits", "dhidden", "dW")})
    res = [floor,
           {"case": c, "provider": "fused_linear", "label": "ours", "status": "ok", "fwdbwd": st(6.6), "fwd": st(6.6),
            "mem_fwdbwd": m["bytes"], "loadavg_1m": "1.0"},
           {"case": c, "provider": "liger_chunked", "label": "Liger", "status": "ok", "fwdbwd": st(12.0),
            "fwd": st(12.0), "mem_fwdbwd": 2 * m["bytes"], "loadavg_1m": "1.0"},
           {"case": c, "provider": "verl_head", "status": "skipped", "reason": "not importable",
            "loadavg_1m": "1.0"}]
    report.derive([r for r in res if r["status"] == "ok"])
    assert abs(res[1]["derived"]["x_mm_valid"] - 1.1) < 1e-9
    assert abs(res[1]["derived"]["mem_x_model"] - 1.0) < 1e-9
    text = "\n".join(report.hidden_targets(res))
    assert "1.10 **met**" in text and "0.66" in text  # vs the valid-token floor; vs the all-N floor
    assert "1.82 **met**" in text and "0.50 **met**" in text  # Liger time / ours; ours / Liger memory
    assert "skipped" in text
    md = "\n".join(report.markdown_case(res))
    assert "not timed: verl_head" in md
