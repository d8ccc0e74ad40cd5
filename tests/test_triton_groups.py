"""λ-GRPO's group weights in one Triton launch (lambda_grpo/kernels/groups.py) against the torch
function every other path uses (lambda_grpo._rowmath.lambda_grpo_weights_and_grad, float64),
which tests/test_reference.py pins to the reference's autograd and to a numpy transcription.

Both compute in float64 and round once to fp32, so each fp32 output may differ from the float64
truth by its own rounding and by float64 roundoff of the shared formulas: the bound is 2 fp32 ulps
of the element plus an absolute 1e-30 (values that are exactly 0 in one must be 0 in the other up
to that). Grid: group sizes 1 (σ = 0), 2, 3 (not a power of two), 8, 64; lengths with ties, all
equal, zeros; λ from 0 through ±60 to ±1e4 and 1e30 (the float64 overflow regime handled by the
shifted softmax); r = 1/9 and 1; contiguous groups and groups spread over rows (group_lengths and
group_index); N_tok normalisers below and above 1.
"""

from __future__ import annotations

import pytest
import torch

from lambda_grpo._rowmath import lambda_grpo_weights_and_grad

pytestmark = pytest.mark.triton


def _kernel():
    from lambda_grpo.kernels.groups import launch_group_weights

    return launch_group_weights


def _truth(lengths, G, lam, r, n_tok, gl=None, gi=None):
    lam64 = torch.tensor(lam, dtype=torch.float64)
    if gl is None:
        f, df = lambda_grpo_weights_and_grad(lengths.double(), G, lam64, r)
    else:
        fa, dfa = lambda_grpo_weights_and_grad(gl.reshape(-1).double(), G, lam64, r)
        B = gl.shape[0]
        f = fa.view(B, G).gather(1, gi[:, None]).squeeze(1)
        df = dfa.view(B, G).gather(1, gi[:, None]).squeeze(1)
    inv = 1 / max(float(n_tok), 1.0)
    return f * inv, f, df * inv


def _close(name, got, want):
    want32 = want.float()
    ulp = torch.finfo(torch.float32).eps * want32.abs()
    bound = 2 * ulp + 1e-30
    err = (got.double() - want).abs()
    worst = int(torch.argmax(err - bound.double()))
    assert bool((err <= bound.double()).all()), (f"{name}: worst element {worst}: got {float(got[worst])!r}, float64 "
                                                 f"truth {float(want[worst])!r}, bound {float(bound[worst]):.3g}")
    assert torch.equal(torch.isfinite(got), torch.isfinite(want32)), name


LAMS = [0.0, 0.3, -0.7, 5.0, -60.0, 1e4, -1e4, 1e30]


@pytest.mark.parametrize("G", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("r", [1 / 9, 1.0])
def test_contiguous_groups_match_the_torch_weights(G, lam, r):
    g = torch.Generator().manual_seed(G * 1000 + LAMS.index(lam) * 10 + int(r))
    n_groups = 3
    lengths = torch.randint(0, 40, (n_groups * G,), generator=g, dtype=torch.int32)
    lengths[:G] = 7  # one group of equal lengths (sigma = 0: z = 0, f = 1)
    if G > 2:
        lengths[G:G + 2] = 0  # ties and empty rows
    n_tok = torch.tensor(float(lengths.sum()), dtype=torch.float32)
    w, f, df = _kernel()(lengths, G, torch.tensor(lam, dtype=torch.float64), r, n_tok)
    tw, tf, tdf = _truth(lengths, G, lam, r, n_tok)
    _close("f", f, tf)
    _close("df", df, tdf)
    _close("w", w, tw)


@pytest.mark.parametrize("lam", [0.0, 0.45, -3.0, 1e4])
def test_groups_spread_over_rows_match(lam):
    """group_lengths (B, G) / group_index (B,): each row carries its group's lengths, rows shuffled."""
    G, B = 4, 10
    g = torch.Generator().manual_seed(7)
    gl = torch.randint(0, 25, (B, G), generator=g)
    gi = torch.randint(0, G, (B,), generator=g)
    lengths = gl.gather(1, gi[:, None]).squeeze(1).to(torch.int32)
    n_tok = torch.tensor(0.5)  # below 1: clamped at 1 as the local count is
    w, f, df = _kernel()(lengths, G, torch.tensor(lam, dtype=torch.float64), 1 / 9, n_tok, gl, gi)
    tw, tf, tdf = _truth(lengths, G, lam, 1 / 9, n_tok, gl, gi)
    _close("f", f, tf)
    _close("df", df, tdf)
    _close("w", w, tw)


def test_non_finite_lambda_gives_nan_and_large_groups_decline():
    lengths = torch.tensor([3, 5, 7, 9], dtype=torch.int32)
    w, f, df = _kernel()(lengths, 2, torch.tensor(float("nan")), 1 / 9, torch.tensor(24.0))
    assert torch.isnan(f).all() and torch.isnan(w).all()
    from lambda_grpo.kernels._config import MAX_GROUP_BLOCK

    big = torch.zeros(MAX_GROUP_BLOCK + 1, dtype=torch.int32)
    assert _kernel()(big, MAX_GROUP_BLOCK + 1, torch.tensor(0.0), 1 / 9, torch.tensor(1.0)) is None


def test_a_nan_normaliser_stays_nan():
    """A tensor normaliser that is not finite and > 0 arrives as NaN (docs/math.md §10): every
    weight it divides must be NaN, as torch.clamp(NaN, min=1) keeps it (tl.maximum would drop it)."""
    lengths = torch.tensor([3, 5, 7, 9], dtype=torch.int32)
    w, f, df = _kernel()(lengths, 2, torch.tensor(0.3, dtype=torch.float64), 1 / 9, torch.tensor(float("nan")))
    assert torch.isnan(w).all() and torch.isnan(df).all() and torch.isfinite(f).all()
