"""The kernels compile for real GPUs: every specialisation the launchers can pick, to cubin for
sm_80 and sm_90, with `ptxas -v` register/spill counts (docs/kernels.md).

Runs `python -m lambda_grpo.kernels._aot` in a subprocess WITHOUT TRITON_INTERPRET: under the
interpreter `@triton.jit` yields interpreted functions that cannot be compiled. Slow on a
cold Triton cache (~1-2 min for its 132 compilations on this machine), seconds on a warm one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lambda_grpo.kernels import _config

pytestmark = [pytest.mark.triton, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_KERNELS = {"vocab_fwd", "vocab_fused", "vocab_bwd", "scale"}
ARCHS = ("sm_80", "sm_90")


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _expected():
    out = set()
    for name, dt, launch in _config.specialisations():
        spec = ",".join(f"{k}={v}" for k, v in launch.constexprs)
        dts = None if dt is None else str(dt).replace("torch.", "")
        for sc in (("D", "plain", "one") if name in VOCAB_KERNELS else ("-",)):
            out.add((name, dts, spec, sc))
    return out


@pytest.fixture(scope="module")
def report():
    res = subprocess.run([sys.executable, "-m", "lambda_grpo.kernels._aot", "--json"], cwd=ROOT, env=_clean_env(),
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout)


def test_every_specialisation_compiles_for_sm80_and_sm90(report):
    got = {}
    for r in report:
        got.setdefault((r["kernel"], r["dtype"], r["spec"], r["stride"]), set()).add(r["arch"])
        assert r["cubin_bytes"] > 0
    assert set(got) == _expected()
    assert all(archs == set(ARCHS) for archs in got.values())


def test_default_configs_do_not_spill(report):
    spills = [(r["kernel"], r["dtype"], r["spec"], r["stride"], r["arch"], r["spill_stores"], r["spill_loads"])
              for r in report if r["spill_stores"] or r["spill_loads"] or r["stack"]]
    assert not spills, spills
    assert max(r["registers"] for r in report) <= 255


def test_vocab_tiles_use_vector_loads():
    """With V and the row stride divisible by 16 (real vocabularies) the logits tiles are read
    with 128-bit loads; this is why V is left to Triton's divisibility specialisation."""
    script = (
        "import re, torch, triton\n"
        "from triton.compiler import ASTSource\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from lambda_grpo.kernels import _aot, _config\n"
        "for name in ('vocab_fwd', 'vocab_fused', 'vocab_bwd'):\n"
        "    fn = _aot.KERNELS[name]\n"
        "    sig, cx, attrs = _aot._signature(fn, torch.bfloat16, dict(_config.vocab_launch(True).constexprs), 'D')\n"
        "    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs),\n"
        "                        target=GPUTarget('cuda', 90, 32), options=dict(num_warps=8))\n"
        "    assert 'ld.global.v4' in ck.asm['ptx'], name\n"
        "print('OK')\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_clean_env(), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-4000:]


FLOAT_HYPERPARAMETERS = {"inv_temp", "eps_low", "eps_high", "dual_clip", "tau_pos", "tau_neg", "beta",
                         "ent_coef", "a", "ln_a", "length_r"}


def test_hyperparameters_never_specialise():
    """No recompilation per hyper-parameter value: every scalar argument Triton may specialise
    on (ints: value 1 and divisibility by 16) is V or a stride; flags, codes, T and G are
    do_not_specialize, and the float hyper-parameters are never specialised by Triton."""
    script = (
        "import json\n"
        "from lambda_grpo.kernels import _aot\n"
        "print(json.dumps([[n, p.name] for n, fn in _aot.KERNELS.items() for p in fn.params\n"
        "                  if not (p.is_constexpr or p.name.endswith('_ptr') or p.do_not_specialize\n"
        "                          or p.name == 'V' or p.name.startswith('stride'))]))\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_clean_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rest = json.loads(res.stdout.strip().splitlines()[-1])
    assert rest and all(name in FLOAT_HYPERPARAMETERS for _, name in rest), rest
