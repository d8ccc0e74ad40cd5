"""The Triton row kernel (lambda_grpo/kernels/rows.py) against the torch row math, with no vocabulary.

Issue 9, point 3: `row_kernel` is fed random (B, T) log-probs, entropies, old/ref log-probs,
advantages and masks directly (`launch_rows`, and once through the engine adapter
`_vocab_triton.row_pass`), and every output is compared *element-wise* with
`lambda_grpo._rowmath.row_pass` run on the same values in float64 (the truth), with the same
function in fp32 as the "plain torch" baseline:

    |kernel - truth| <= 2 |fp32 torch - truth| + atol + ULPS * eps32 * scale      (per element)

where `scale` is the magnitude a rounding error of that element is proportional to: |truth|
for per-token values, the sum of |terms| for per-row sums, and for a traced quantity the same
trace taken over |x| (resp. |g|) in float64 (a scan's roundoff is relative to the terms it
adds, not to the possibly cancelled result). The worst element is printed with its row,
position, and the three values.

Failures name the kernel phase whose output is wrong (A compact x, B forward scans R/P, C
"both" z, D token terms / sums / direct coefficients, E reverse scans U/Q, F "both" adjoint):
the outputs are checked in pipeline order, ratio (A-C), per-token loss and KL (D), per-row
parts (D), dL/dH (D), dL/dlogp (D direct; E-F adjoint), and one assertion lists every wrong
output with its phase, the first one being the earliest phase that went wrong. The pure
trace adjoint (beta = 0, no entropy: phases E-F only) is tested on its own too, and phase A
by a metamorphic test (a row with holes equals, bit for bit, its valid tokens packed).
Long rows are also held to the project's aggregate rule (tests/_compare.py) on the loss,
ratio mean, rho and dL/dlogp: an error that is systematic along a row (a bias of the decay
weights) passes element-wise but accumulates in the per-row sums. Non-finite values: a NaN
log-prob must give a NaN loss; an overflowing KL must stay out of the loss when beta = 0.
The planted-bug table is in docs/kernels.md ("Row kernel: planted bugs and the tests that
catch them").

Speed. The interpreter costs ~0.6 ms per program and more per loop iteration, and its
generic `tl.associative_scan` calls the combine function once per element (~0.4 ms each: a
T = 4096 row spent 3-4 s in its two scans). For the tests of this file only, `_fast_scan`
replaces that fallback by a log-depth Hillis-Steele scan which calls the kernel's own combine
function (`rows._lin`) on whole vectors, as an associative scan may (the GPU's is a tree too);
`test_fast_scan_matches_interpreter_scan` checks it against the interpreter's own on a
multi-chunk row. LG_SLOW_SCAN=1 keeps the interpreter's scan. Chunk carries are reached with
tiny row chunks (`small_blocks`) on short rows and with the production chunk of 128 on the
long rows (T >= 4096).
"""

from __future__ import annotations

import os
import zlib
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch

import lambda_grpo as lg
from lambda_grpo import _rowmath
from lambda_grpo._batch import Batch
from lambda_grpo._rowmath import token_constants
from lambda_grpo.config import LOG_RATIO_CLAMP

pytestmark = [
    pytest.mark.triton,
    # numpy evaluates both sides of the interpreter's tl.where: the NaN / inf planted at holes
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU)"),
]

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FACTOR = 2.0
EPS32 = 2.0**-23
ULPS = 4.0
ATOL = 1e-7
TRACES = [(None, "ratio"), ("recent", "ratio"), ("both", "ratio"), ("recent", "weight"), ("both", "weight")]


# --------------------------------------------------------------------------------------------
# Interpreter speed-up for this file: a log-depth associative scan
# --------------------------------------------------------------------------------------------
def _fast_generic_scan(self, input):
    """Inclusive Hillis-Steele scan calling the kernel's combine function on whole vectors:
    y_i <- combine(y_{i-d}, y_i) for i >= d, d = 1, 2, 4, ... (exact for an associative
    combine, which `tl.associative_scan` requires)."""
    ax = self.axis
    data = [np.array(arg.handle.data, copy=True) for arg in input]
    dtypes = [arg.dtype for arg in input]
    n = data[0].shape[ax]
    d = 1
    while d < n:
        # whole-length operands (block shapes must stay powers of 2): lanes i >= d combine
        # y_{i-d} with y_i; lanes i < d are computed on a dummy left operand and discarded
        left = [np.roll(x, d, axis=ax) for x in data]
        ret = self.combine_fn.fn(*[self.to_tensor(v, dt) for v, dt in zip(left, dtypes)],
                                 *[self.to_tensor(v, dt) for v, dt in zip(data, dtypes)])
        ret = ret if isinstance(ret, tuple) else (ret,)
        keep = (np.arange(n) >= d).reshape([n if i == ax else 1 for i in range(data[0].ndim)])
        data = [np.where(keep, np.broadcast_to(r.handle.data if hasattr(r, "handle") else r, x.shape),
                         x).astype(x.dtype) for x, r in zip(data, ret)]
        d *= 2
    return [self.to_tensor(x, dt) for x, dt in zip(data, dtypes)]


_INTERPRETER_SCAN = {}  # the interpreter's own generic scan, while this module's tests run


@pytest.fixture(autouse=True, scope="module")
def _fast_scan():
    if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("LG_SLOW_SCAN", "0") == "1":
        yield
        return
    from triton.runtime import interpreter as itp

    _INTERPRETER_SCAN["fn"] = itp.ScanOps.generic_scan
    itp.ScanOps.generic_scan = _fast_generic_scan
    try:
        yield
    finally:
        itp.ScanOps.generic_scan = _INTERPRETER_SCAN.pop("fn")


@pytest.fixture
def small_blocks(monkeypatch):
    """Row chunks of 16: T = 45 spans 3 chunks, so every scan carries across chunk edges."""
    from lambda_grpo.kernels import _config

    monkeypatch.setattr(_config, "ROW_BLOCK_T", 16)


# --------------------------------------------------------------------------------------------
# Random (B, T) rows
# --------------------------------------------------------------------------------------------
ROW_KINDS = ("holes", "empty", "len1", "full", "prefix", "suffix", "sparse")


def _row_mask(kind: str, T: int, g: torch.Generator) -> torch.Tensor:
    if kind == "full":
        return torch.ones(T, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(T, dtype=torch.bool)
    if kind == "len1":
        m = torch.zeros(T, dtype=torch.bool)
        m[int(torch.randint(0, T, (1,), generator=g))] = True
        return m
    if kind == "holes":
        return torch.rand(T, generator=g) > 0.3
    if kind == "sparse":
        return torch.rand(T, generator=g) > 0.9
    n = int(torch.randint(1, T + 1, (1,), generator=g))
    m = torch.arange(T) < n
    return m if kind == "prefix" else m.flip(0)  # suffix: left-padded


def make_rows(kinds, T: int, seed: int = 0, per_token_adv: bool = True, off_policy: bool = True,
              with_ref: bool = True, with_entropy: bool = True,
              spread: float = 0.3) -> Dict[str, Optional[torch.Tensor]]:
    """fp32 (B, T) inputs, one row per mask kind. Holes carry NaN / inf garbage in every input
    (the kernel must never read them); advantages are per token or per row (broadcast)."""
    g = torch.Generator().manual_seed(seed)
    B = len(kinds)
    mask = torch.stack([_row_mask(k, T, g) for k in kinds]) if B else torch.zeros(0, T, dtype=torch.bool)
    logp = torch.log(torch.rand(B, T, generator=g).clamp(min=1e-6))  # in [-13.8, 0]
    adv = torch.randn(B, T, generator=g) if per_token_adv else torch.randn(B, 1, generator=g).expand(B, T).clone()
    old = logp + spread * torch.randn(B, T, generator=g)
    ref = logp + spread * torch.randn(B, T, generator=g)
    ent = torch.rand(B, T, generator=g) * 3
    junk = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])[torch.arange(B * T) % 4].view(B, T)

    def holey(v):
        return torch.where(mask, v, junk).contiguous()

    return dict(mask=mask, logp=holey(logp), adv=holey(adv), old=holey(old) if off_policy else None,
                ref=holey(ref) if with_ref else None, entropy=holey(ent) if with_entropy else None)


def _batch(rows, dtype, lam, G) -> Batch:
    B, T = rows["mask"].shape

    def cast(v):
        return None if v is None else v.to(DEV, dtype)

    return Batch(logits=torch.zeros(B, T, 1, dtype=dtype, device=DEV),
                 tokens=torch.zeros(B, T, dtype=torch.long, device=DEV),
                 mask=rows["mask"].to(DEV), advantages=cast(rows["adv"]), old_logp=cast(rows["old"]),
                 ref_logp=cast(rows["ref"]), lam=None if lam is None else torch.tensor(float(lam), dtype=dtype),
                 num_tokens=None, num_sequences=None, group_size=G)


def _launch(rows, cfg: lg.LossConfig, consts, write_coef=True, write_tokens=True, **override):
    """launch_rows on the fp32 inputs and the fp32 TokenConstants, as the engine calls it."""
    from lambda_grpo.kernels.rows import launch_rows

    B, T = rows["mask"].shape

    def f32(v):
        return None if v is None else v.to(DEV, torch.float32).contiguous()

    kw = dict(entropy=f32(rows["entropy"]), old_logp=f32(rows["old"]), ref_logp=f32(rows["ref"]),
              trace_coef=f32(consts.coef), ratio_trace=cfg.trace if cfg.ratio_trace else None,
              trace_decay=cfg.trace_decay, eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_floor,
              surrogate=cfg.surrogate, sapo_tau_pos=cfg.sapo_tau_pos, sapo_tau_neg=cfg.sapo_tau_neg,
              beta=cfg.beta, kl_estimator=cfg.kl_estimator, kl_ratio_weighted=cfg.kl_ratio_weighted,
              entropy_coef=cfg.entropy_coef, write_coef=write_coef, write_tokens=write_tokens, z=None)
    kw.update(override)
    return launch_rows(f32(rows["logp"]), rows["mask"].to(DEV).contiguous(), f32(consts.A), consts.lengths.contiguous(),
                       f32(consts.w_row), **kw)[:4]  # (the given-z gradient is tested through the engine adapter)


# --------------------------------------------------------------------------------------------
# The element-wise rule and the phase-naming comparison
# --------------------------------------------------------------------------------------------
def _abs_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in float64; 0 where both are NaN or the same infinity, inf where only one is NaN."""
    a, b = a.double().cpu(), b.double().cpu()
    d = (a - b).abs()
    same = (torch.isnan(a) & torch.isnan(b)) | (torch.isinf(a) & (a == b))
    d = torch.where(same, torch.zeros_like(d), d)
    return torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)


def elementwise_mismatch(phase: str, what: str, got, truth, base, scale=None, atol: float = ATOL,
                         index_names=("row", "t")) -> Optional[str]:
    """None if every element satisfies the rule, else a message naming the phase and the worst
    element (index, kernel, truth, fp32 torch, error, allowed)."""
    got, truth, base = got.detach().double().cpu(), truth.detach().double().cpu(), base.detach().double().cpu()
    assert got.shape == truth.shape == base.shape, (what, got.shape, truth.shape, base.shape)
    if got.numel() == 0:
        return None
    err = _abs_err(got, truth)
    scale = truth.abs().nan_to_num(0, 0, 0) if scale is None else scale.detach().double().cpu()
    allowed = FACTOR * _abs_err(base, truth) + atol + ULPS * EPS32 * scale
    excess = torch.where(err > allowed, err - allowed + 1e-300, torch.zeros_like(err))
    excess = torch.where(torch.isinf(err) & ~torch.isinf(allowed), torch.full_like(err, float("inf")), excess)
    if not bool((excess > 0).any()):
        return None
    flat = int(torch.argmax(torch.where(torch.isnan(excess), torch.zeros_like(excess), excess)))
    idx = np.unravel_index(flat, tuple(got.shape))
    where = ", ".join(f"{n} {int(i)}" for n, i in zip(index_names, idx))
    return (f"{phase}: {what} wrong at [{where}]: kernel {float(got[idx]):.9g}, float64 truth "
            f"{float(truth[idx]):.9g}, fp32 torch {float(base[idx]):.9g}; |err| {float(err[idx]):.3e} > allowed "
            f"{float(allowed[idx]):.3e}; {int((excess > 0).sum())} of {got.numel()} elements out of tolerance")


def _phase_labels(cfg: lg.LossConfig, has_ref: bool = True) -> Dict[str, str]:
    if cfg.ratio_trace and cfg.trace == "both":
        z = "phases A-C (x = logp - old compacted by ordinal; forward scans R, P; 'both' z)"
        adj = "phases E-F (reverse scans U, Q of g = -ds; 'both' adjoint with e = min(2k, n-1))"
    elif cfg.ratio_trace:
        z = "phases A-B (x = logp - old compacted by ordinal; forward scan R)"
        adj = "phase E (reverse scan U of g = -ds)"
    else:
        z = "phase D (untraced z = logp - old, rho = exp(clamp(z)))"
        adj = None
    d = "phase D (per-token terms: surrogate, KL, entropy)"
    if adj is None:
        coef = "phase D (direct coefficient dL/dlogp = w (beta dkl - c ds))"
    elif cfg.beta == 0 and not has_ref:
        coef = adj
    else:
        coef = f"phase D (w beta dkl) + {adj}"
    return dict(z=z, d=d, parts="phase D (per-row sums)", coef_h="phase D (direct coefficient dL/dH = -w entropy_coef)",
                coef=coef)


class Computed:
    """The float64 truth, the fp32 torch baseline and the kernel outputs for one case."""

    def __init__(self, rows, cfg: lg.LossConfig, lam: Optional[float] = 0.7, G: int = 1, write_coef=True,
                 write_tokens=True):
        self.rows, self.cfg = rows, cfg
        lam = lam if cfg.aggregation == "lambda_grpo" else None
        self.res = {}
        for name, dt in (("truth", torch.float64), ("base", torch.float32)):
            batch = _batch(rows, dt, lam, G)
            consts = token_constants(batch, cfg, dt)
            ent = None if rows["entropy"] is None else rows["entropy"].to(DEV, dt)
            rp = _rowmath.row_pass(rows["logp"].to(DEV, dt), ent, batch, cfg, consts, per_token=True)
            self.res[name] = (batch, consts, rp)
        _, consts32, _ = self.res["base"]
        self.coef_lp, self.coef_h, self.parts, self.tokens = _launch(rows, cfg, consts32, write_coef, write_tokens)

    # per-row parts from the torch per-token values (the kernel's PARTS, same order)
    def parts_of(self, name):
        from lambda_grpo.kernels.rows import PARTS

        batch, k, rp = self.res[name]
        mask, cfg = k.mask, self.cfg
        pt = rp.per_token
        zero = torch.zeros((), dtype=pt["loss"].dtype, device=DEV)
        rho = pt["ratio"]
        S = pt["loss"].sum(1)
        cols = dict(wS=k.w_row * S, S=S,
                    clip_low=(mask & (k.A < 0) & (rho < 1 - cfg.eps_low)).to(S.dtype).sum(1),
                    clip_high=(mask & (k.A > 0) & (rho > 1 + cfg.eps_high)).to(S.dtype).sum(1),
                    ratio=rho.sum(1), kl=pt["kl"].sum(1), entropy=torch.where(mask, pt["entropy"], zero).sum(1))
        return torch.stack([cols[p] for p in PARTS], dim=1)

    def magnitudes(self) -> Dict[str, torch.Tensor]:
        """Float64 sizes that a rounding error of each output is proportional to: the magnitudes
        of the terms each value adds (|terms| of a sum, not its possibly cancelled result).

        x = logp - old, d = ref - logp, E = exp(d). A traced z adds trace(|x|) (the docs/math.md §3
        weights over |x|), so rho is known to rho (1 + trace(|x|)) ulps; the surrogate adds at
        most |c A| (rho + 1 + eps_high + dual); the k3 KL adds E, |d| and 1, its derivative E
        and 1; dL/dlogp adds w beta |dkl| and w |ds|, the latter through the trace adjoint when
        traced. Per-row sums add their per-token magnitudes. Zero at holes."""
        cfg = self.cfg
        batch, k, _ = self.res["truth"]
        mask = k.mask
        f64 = torch.float64
        zero = torch.zeros((), dtype=f64, device=DEV)

        def valid(v):
            return torch.where(mask, v, zero)

        logp = valid(self.rows["logp"].to(DEV, f64))
        old = logp if batch.old_logp is None else valid(batch.old_logp)
        x = valid(logp - old)
        z = _rowmath.trace_forward(x, mask, cfg) if cfg.ratio_trace else x
        zabs = _rowmath.trace_forward(x.abs(), mask, cfg) if cfg.ratio_trace else torch.zeros_like(x)
        rho = valid(torch.exp(z.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)))
        rho_mag = rho * (1 + zabs)
        cA = k.A.abs() * (1 if k.coef is None else k.coef.abs())
        s_mag = cA * (rho_mag + 1 + cfg.eps_high + (cfg.dual_clip or 0.0))
        if batch.ref_logp is not None:
            d = valid(batch.ref_logp - logp)
            E = torch.exp(d)
            kl_mag = valid({"k3": E + d.abs() + 1, "k1": d.abs(), "k2": d * d / 2}[cfg.kl_estimator])
            dkl_mag = valid({"k3": E + 1, "k1": torch.ones_like(d), "k2": d.abs()}[cfg.kl_estimator])
        else:
            kl_mag = dkl_mag = torch.zeros_like(x)
        H = torch.zeros_like(x) if self.rows["entropy"] is None else valid(self.rows["entropy"].to(DEV, f64)).abs()
        loss_mag = valid(cfg.beta * kl_mag + s_mag + abs(cfg.entropy_coef) * H)
        g_mag = k.W * cA * rho_mag
        if cfg.ratio_trace:
            g_mag = _rowmath.trace_backward(g_mag, mask, cfg)
        coef_mag = valid(k.W * cfg.beta * dkl_mag + g_mag)
        S = loss_mag.sum(1)
        parts = dict(wS=k.w_row.abs() * S, S=S, clip_low=torch.zeros_like(S), clip_high=torch.zeros_like(S),
                     ratio=rho_mag.sum(1), kl=kl_mag.sum(1), entropy=H.sum(1))
        return dict(rho=rho_mag, loss=loss_mag, kl=kl_mag, coef=coef_mag, parts=parts)

    def near_clip_bounds(self):
        """Per row, the valid tokens whose true ratio is within 1e-5 of a clip bound (an
        indicator there may honestly flip)."""
        _, k, rp = self.res["truth"]
        rho = rp.per_token["ratio"]
        near = ((rho - (1 - self.cfg.eps_low)).abs() < 1e-5) | ((rho - (1 + self.cfg.eps_high)).abs() < 1e-5)
        return (near & k.mask).sum(1).to(torch.float64)

    def mismatches(self, check_tokens=True, check_parts=True, check_coef=True) -> List[str]:
        """Every output out of tolerance, in pipeline order (so the first names the earliest
        phase that went wrong)."""
        from lambda_grpo.kernels.rows import PARTS

        lab = _phase_labels(self.cfg, self.rows["ref"] is not None)
        _, k, truth = self.res["truth"]
        _, _, base = self.res["base"]
        mag = self.magnitudes()
        out = []

        def add(msg):
            if msg is not None:
                out.append(msg)

        if check_tokens and self.tokens is not None:
            for j, key, what, phase in ((1, "ratio", "per-token ratio rho_t (tokens[1])", lab["z"]),
                                        (0, "loss", "per-token loss l_t (tokens[0])", lab["d"]),
                                        (2, "kl", "per-token KL kl_t (tokens[2])", lab["d"])):
                add(elementwise_mismatch(phase, what, self.tokens[j], truth.per_token[key], base.per_token[key],
                                         scale=mag["rho" if key == "ratio" else key]))
        if check_parts:
            tp, bp = self.parts_of("truth"), self.parts_of("base")
            near = self.near_clip_bounds()
            for j, name in enumerate(PARTS):
                # an indicator count may flip at a token whose true ratio sits on a clip bound
                atol = ATOL + (near if name.startswith("clip") else 0.0)
                add(elementwise_mismatch(lab["parts"], f"parts[:, PART[{name!r}]]", self.parts[:, j], tp[:, j],
                                         bp[:, j], scale=mag["parts"][name], atol=atol, index_names=("row",)))
        if check_coef:
            if truth.dentropy is not None:
                add(elementwise_mismatch(lab["coef_h"], "dL/dH (coef_h)", self.coef_h, truth.dentropy, base.dentropy))
            add(elementwise_mismatch(lab["coef"], "dL/dlogp (coef_lp)", self.coef_lp, truth.dlogp, base.dlogp,
                                     scale=mag["coef"]))
        return out

    def assert_ok(self, **kw):
        bad = self.mismatches(**kw)
        assert not bad, ("row kernel differs from the float64 torch row math (cfg "
                         f"{self.cfg.to_json()}); first wrong phase listed first:\n  - " + "\n  - ".join(bad))


def _cfg(**kw):
    base = dict(aggregation="dapo", beta=0.1, entropy_coef=0.01, trace_decay=0.93)
    base.update(kw)
    return lg.LossConfig(**base)


# --------------------------------------------------------------------------------------------
# Every trace style x mode, over every row kind, across chunk edges
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trace,mode,kl",
                         [(t, m, "k3") for t, m in TRACES] + [(None, "ratio", "k1"), ("both", "ratio", "k2")])
def test_rows_trace_x_mode(small_blocks, trace, mode, kl):
    """Rows of every kind (holes, empty, length 1, full, prefix, suffix, sparse) over 3 chunks
    of 16, per-token advantages, KL, entropy bonus, dual clip, lambda_grpo weights. (The KL
    estimator is a phase-D scalar, the same code for every trace; k1/k2 run on two of them.)"""
    cfg = _cfg(aggregation="lambda_grpo", trace=trace, trace_mode=mode, kl_estimator=kl, dual_clip=1.5,
               eps_high=0.28)
    seed = zlib.crc32(f"{trace}-{mode}-{kl}".encode()) % 997  # stable across processes (hash() is not)
    rows = make_rows(ROW_KINDS + ("holes",), T=45, seed=seed)
    Computed(rows, cfg, lam=0.8, G=2).assert_ok()


# (variant, trace, mode): has_old / has_ref / has_ent and beta are kernel flags, on every path;
# adv_clamp_min and per-row advantages only change the torch-made A (one path each); the
# decay a = 1 only matters to the scans. Weight mode is the untraced kernel path with c_t.
OPTION_CASES = ([(v, t, m) for v in ("on_policy", "no_ref", "beta0_with_ref", "no_entropy")
                 for t, m in ((None, "ratio"), ("recent", "ratio"), ("both", "ratio"), ("both", "weight"))]
                + [("adv_clamp", "both", "ratio"), ("per_row_adv", "recent", "weight"),
                   ("decay1", "recent", "ratio"), ("decay1", "both", "ratio")])


@pytest.mark.parametrize("variant,trace,mode", OPTION_CASES)
def test_rows_options(small_blocks, variant, trace, mode):
    """One option at a time: on-policy (no old), no ref, beta = 0 with a ref (KL metric only),
    no entropy, adv_clamp_min, per-row advantages, trace_decay = 1 (no decay)."""
    kw = dict(trace=trace, trace_mode=mode, aggregation="grpo")
    rk = dict(per_token_adv=True)
    if variant == "on_policy":
        rk["off_policy"] = False
    elif variant == "no_ref":
        kw["beta"], rk["with_ref"] = 0.0, False
    elif variant == "beta0_with_ref":
        kw["beta"] = 0.0
    elif variant == "no_entropy":
        kw["entropy_coef"], rk["with_entropy"] = 0.0, False
    elif variant == "adv_clamp":
        kw["adv_clamp_min"] = -0.1
    elif variant == "per_row_adv":
        rk["per_token_adv"] = False
    elif variant == "decay1":
        kw["trace_decay"] = 1.0
        rk["spread"] = 0.1
    rows = make_rows(("holes", "full", "len1", "empty", "suffix"), T=37, seed=len(variant), **rk)
    Computed(rows, _cfg(**kw)).assert_ok()


@pytest.mark.parametrize("aggregation", ["grpo", "lambda_grpo"])
def test_rows_aggregation_weights(small_blocks, aggregation):
    """The row weight w_i enters the parts (w S) and every coefficient: grpo's 1/(B n_i) and
    lambda_grpo's f_i / N_tok with a large lambda (very unequal f_i). The other aggregations
    give every row the same w, as dapo (the default of the other tests) does."""
    cfg = _cfg(aggregation=aggregation, trace="both")
    rows = make_rows(("holes", "prefix", "full", "len1"), T=40, seed=5)
    Computed(rows, cfg, lam=4.0, G=2).assert_ok()


@pytest.mark.parametrize("trace", [None, "recent", "both"])
def test_pure_trace_adjoint(small_blocks, trace):
    """beta = 0, no entropy, ratio mode: dL/dlogp is exactly w times the adjoint of the trace
    (phases E and F; with trace=None it is phase D's w (-ds)). Clipping is turned off
    (eps = 1e6: rho never leaves the range) so that every token carries gradient."""
    cfg = lg.LossConfig(aggregation="dapo", trace=trace, trace_decay=0.9, beta=0.0, eps_low=1e6, eps_high=1e6)
    rows = make_rows(("holes", "full", "sparse", "len1", "suffix"), T=45, seed=3, with_ref=False, with_entropy=False)
    c = Computed(rows, cfg)
    assert c.coef_h.abs().max() == 0
    c.assert_ok(check_parts=False)  # the ratio first: a wrong z (A-C) is named as such


def test_scalar_row_and_empty_batch():
    """T = 1 rows, and B = 0 / T = 0 launches (nothing to run, zeros back)."""
    cfg = _cfg(trace="both")
    Computed(make_rows(("full", "empty", "full"), T=1, seed=1), cfg).assert_ok()
    for B, T in ((0, 5), (3, 0)):
        rows = make_rows(("full",) * B, T=T)
        k = token_constants(_batch(rows, torch.float32, None, 1), cfg, torch.float32)
        coef_lp, coef_h, parts, toks = _launch(rows, cfg, k)
        assert coef_lp.shape == (B, T) and parts.shape[0] == B and toks.shape == (3, B, T)
        assert parts.abs().sum() == 0


def test_write_flags(small_blocks):
    """write_tokens=False returns no tokens and the same parts; write_coef=False leaves the
    coefficients unwritten (zero) on the untraced path only (the traced path writes them, the
    adjoint needs the buffer)."""
    rows = make_rows(("holes", "len1"), T=20, seed=8)
    for trace in (None, "both"):
        cfg = _cfg(trace=trace)
        full = Computed(rows, cfg)
        k = full.res["base"][1]
        lp, h, parts, toks = _launch(rows, cfg, k, write_tokens=False)
        assert toks is None
        assert torch.equal(parts, full.parts) and torch.equal(lp, full.coef_lp) and torch.equal(h, full.coef_h)
        lp, h, parts, _ = _launch(rows, cfg, k, write_coef=False)
        assert torch.equal(parts, full.parts)
        if trace is None:
            assert lp.abs().max() == 0 and h.abs().max() == 0


def test_holes_do_not_break_a_trace(small_blocks):
    """Phase A (compaction by ordinal): a row with holes gives, at its valid tokens, bit for bit
    the ratio, loss, KL and dL/dlogp of the same valid tokens packed at the front of a row."""
    for trace in ("recent", "both"):
        cfg = _cfg(trace=trace)
        rows = make_rows(("holes", "sparse", "suffix"), T=45, seed=21)
        packed = {}
        m = rows["mask"]
        order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)  # valid tokens first, in order
        for key, v in rows.items():
            packed[key] = None if v is None else torch.gather(v, 1, order)
        outs = []
        for r in (rows, packed):
            k = token_constants(_batch(r, torch.float32, None, 1), cfg, torch.float32)
            outs.append(_launch(r, cfg, k))
        (lp_h, _, _, tok_h), (lp_p, _, _, tok_p) = outs
        for b in range(m.shape[0]):
            n = int(m[b].sum())
            for name, h, p in (("ratio", tok_h[1], tok_p[1]), ("loss", tok_h[0], tok_p[0]), ("kl", tok_h[2], tok_p[2]),
                               ("dL/dlogp", lp_h, lp_p)):
                a, bb = h[b][m[b]], p[b][:n]
                assert torch.equal(a, bb), (f"phase A (compaction by valid-token ordinal; or a phase reading outside "
                                            f"its row's compacted data), trace={trace}: {name} of row {b} with "
                                            f"holes differs from the packed row at ordinal "
                                            f"{int(torch.nonzero(a != bb)[0])}")


# --------------------------------------------------------------------------------------------
# Long rows: the scans over T >= 4096 with the production chunk of 128
# --------------------------------------------------------------------------------------------
def assert_as_accurate_as_torch(c: Computed):
    """The project's aggregate rule (tests/_compare.py: max error <= 2 x fp32 torch's + 1e-6 +
    4 ulps of max |truth|) on what a step uses: the loss sum_i w_i S_i, the ratio mean, rho and
    dL/dlogp. Element-wise the scans are judged relative to the terms they add (`magnitudes`);
    this catches an error that is systematic along a long row (a bias of the decay weights a^k
    that the per-row sums accumulate), which the torch engine does not have."""
    from lambda_grpo.kernels.rows import PART
    from tests._compare import assert_close_to_truth

    lab = _phase_labels(c.cfg)
    _, k64, truth = c.res["truth"]
    _, k32, base = c.res["base"]
    cnt = max(1, int(k64.count))
    f32 = torch.float32
    assert_close_to_truth(f"{lab['z']}: rho", c.tokens[1], truth.per_token["ratio"], base.per_token["ratio"], f32)
    assert_close_to_truth(f"{lab['parts']} of the traced ratio: loss = sum_i parts[i, wS]",
                          c.parts[:, PART["wS"]].sum(), truth.loss, base.loss, f32)
    assert_close_to_truth(f"{lab['parts']} of the traced ratio: ratio_mean = sum_i parts[i, ratio] / N",
                          c.parts[:, PART["ratio"]].sum() / cnt, truth.metrics["ratio_mean"],
                          base.metrics["ratio_mean"], f32)
    assert_close_to_truth(f"{lab['coef']}: dL/dlogp", c.coef_lp, truth.dlogp, base.dlogp, f32)


@pytest.mark.parametrize("trace,decay,T,kind", [("recent", 0.99, 4096, "holes"), ("both", 0.99, 4096, "full"),
                                                 ("both", 0.999, 8192, "holes")])
def test_long_rows(trace, decay, T, kind):
    """z and its adjoint over 32-64 chunks of 128 (the production chunk): a full row, and rows
    with holes (the ordinal compaction then lays the chunks out differently from the positions).
    Element-wise, then as accurate as the fp32 torch engine in the aggregate."""
    cfg = lg.LossConfig(aggregation="lambda_grpo", trace=trace, trace_decay=decay, beta=0.05, entropy_coef=0.01,
                        dual_clip=3.0)
    rows = make_rows((kind,), T=T, seed=T + len(trace), spread=0.05)
    c = Computed(rows, cfg, lam=0.5)
    c.assert_ok()
    assert_as_accurate_as_torch(c)


def test_long_row_pure_adjoint():
    """beta = 0, no entropy, T = 4096 'both': phases E-F alone over 32 chunks, no decay of the
    credit to the start of the row (a = 1)."""
    cfg = lg.LossConfig(aggregation="dapo", trace="both", trace_decay=1.0, beta=0.0, eps_low=1e6, eps_high=1e6)
    rows = make_rows(("holes",), T=4096, seed=9, with_ref=False, with_entropy=False, spread=0.002)
    Computed(rows, cfg).assert_ok(check_parts=False)  # the ratio first: a wrong z (A-C) is named as such


# --------------------------------------------------------------------------------------------
# Through the engine adapter (loss, metrics, dlam, per-token dict)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trace,mode,extra", [
    (None, "ratio", {}), ("both", "ratio", {}), ("recent", "weight", {}),
    # the row reductions the adapter makes in torch around the kernel: GSPO's sequence ratio
    # (the kernel takes z, returns dL/dz) and VESPO's weight (folded into c_t)
    (None, "ratio", dict(importance_sampling="sequence")), ("both", "weight", dict(importance_sampling="sequence")),
    (None, "ratio", dict(surrogate="vespo", dual_clip=None)),
    ("recent", "weight", dict(surrogate="vespo", dual_clip=None)),
])
def test_engine_row_pass(small_blocks, trace, mode, extra):
    """`_vocab_triton.row_pass` (the adapter the custom ops call): loss, dlam, every metric and
    the per-token dict, against `_rowmath.row_pass` in float64."""
    from lambda_grpo import _vocab_triton

    cfg = _cfg(**{**dict(aggregation="lambda_grpo", trace=trace, trace_mode=mode, dual_clip=2.0), **extra})
    rows = make_rows(("holes", "empty", "full", "len1"), T=40, seed=13)
    rows["entropy"] = torch.where(rows["mask"], rows["entropy"], torch.zeros(()))  # as the vocab pass writes it
    c = Computed(rows, cfg, lam=-1.5, G=2)
    batch, k, base = c.res["base"]
    _, k64, truth = c.res["truth"]
    got = _vocab_triton.row_pass(rows["logp"].to(DEV, torch.float32), rows["entropy"].to(DEV, torch.float32),
                                 batch, cfg, k, per_token=True)
    mag = c.magnitudes()
    cnt = max(1, int(k.count))
    scale = {"loss": (k64.w_row * mag["parts"]["S"]).sum(), "dlam": (k64.dseq_weight.abs() * mag["parts"]["S"]).sum(),
             "ratio_mean": mag["parts"]["ratio"].sum() / cnt, "kl_mean": mag["parts"]["kl"].sum() / cnt}
    phase = "phase D (per-row sums) through the engine adapter"
    values = [("loss", got.loss, truth.loss, base.loss), ("dlam", got.dlam, truth.dlam, base.dlam)]
    assert set(got.metrics) == set(truth.metrics)
    values += [(f"metrics[{key!r}]", got.metrics[key], v, base.metrics[key]) for key, v in truth.metrics.items()]
    bad = []
    for name, g, t, b in values:
        key = name.split("'")[1] if "'" in name else name
        sc = scale.get(key)
        atol = ATOL + (1.0 / cnt if key.startswith("clip") else 0.0)  # one token's indicator may flip
        bad.append(elementwise_mismatch(phase, name, g.reshape(-1), t.reshape(-1), b.reshape(-1),
                                        scale=None if sc is None else sc.reshape(1), atol=atol, index_names=("i",)))
    for key in _rowmath.PER_TOKEN_KEYS:
        sc = {"ratio": mag["rho"], "loss": mag["loss"], "kl": mag["kl"]}.get(key)
        bad.append(elementwise_mismatch(phase, f"per_token[{key!r}]", got.per_token[key], truth.per_token[key],
                                        base.per_token[key], scale=sc))
    if extra:  # dL/dlogp made by the adapter (kernel's direct slope + torch VJP of the given z / phi)
        bad.append(elementwise_mismatch("dL/dlogp through the engine adapter", "dlogp", got.dlogp, truth.dlogp,
                                        base.dlogp))
    bad = [b for b in bad if b]
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------------------------
# The interpreter speed-up itself
# --------------------------------------------------------------------------------------------
def test_fast_scan_matches_interpreter_scan(small_blocks):
    """The log-depth scan of this file gives the kernel the same results (to fp32 roundoff of
    a different association order) as the interpreter's own element-by-element scan."""
    if "fn" not in _INTERPRETER_SCAN:
        pytest.skip("the fast scan is not in use (no interpreter, or LG_SLOW_SCAN=1)")
    from triton.runtime import interpreter as itp

    cfg = _cfg(trace="both", trace_decay=0.97)
    rows = make_rows(("holes", "full"), T=45, seed=17)
    fast = Computed(rows, cfg)
    itp.ScanOps.generic_scan = _INTERPRETER_SCAN["fn"]
    try:
        slow = Computed(rows, cfg)
    finally:
        itp.ScanOps.generic_scan = _fast_generic_scan
    for name, a, b in (("coef_lp", fast.coef_lp, slow.coef_lp), ("tokens", fast.tokens, slow.tokens),
                       ("parts", fast.parts, slow.parts)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    slow.assert_ok()


# --------------------------------------------------------------------------------------------
# Non-finite values: a NaN log-prob; beta = 0 with an overflowing KL (docs/math.md §2: the KL enters
# the loss only through beta kl_t)
# --------------------------------------------------------------------------------------------
def _collapsed_token_rows():
    """One token the policy has collapsed on (logp = -95) while the reference gives it -1:
    d = ref - logp = 94, exp(d) overflows fp32, so kl_t = inf (the KL metric is honestly inf)."""
    rows = make_rows(("full", "holes"), T=20, seed=4)
    rows["logp"][0, 1], rows["old"][0, 1], rows["ref"][0, 1] = -95.0, -95.2, -1.0
    return rows


@pytest.mark.parametrize("trace", [None, "recent", "both"])
def test_beta0_overflowing_kl_stays_out_of_the_loss(small_blocks, trace):
    """Phase D: with beta = 0 (DAPO's setting, ref_logp given only to log the KL) the loss and
    dL/dlogp must not see kl_t: 0 * inf would make them NaN. The torch engine and the reference
    leave the KL term out when beta = 0; the kernel computed beta * kl and beta * dkl."""
    cfg = lg.LossConfig(aggregation="dapo", beta=0.0, trace=trace, entropy_coef=0.01)
    c = Computed(_collapsed_token_rows(), cfg)
    assert torch.isinf(c.tokens[2][0, 1]), "the KL itself overflows (and is reported as such)"
    c.assert_ok()


@pytest.mark.parametrize("trace,with_ref", [(None, False), ("both", False), (None, True)])
def test_nonfinite_logp_gives_nonfinite_loss(small_blocks, trace, with_ref):
    """Phase D: a NaN log-prob of a valid token makes its l_t, the row sums and the loss NaN, as
    in torch (row_pass: x = NaN - old, rho = NaN, s = min(NaN, clip(NaN) A) = NaN). The kernel's
    surrogate used tl.minimum / tl.maximum, which drop a NaN: s came out lo * A, finite, and
    only a ref_logp with beta * kl = 0 * NaN had made the loss NaN."""
    cfg = lg.LossConfig(aggregation="dapo", beta=0.0, trace=trace)
    rows = make_rows(("full", "holes"), T=20, seed=6, with_ref=with_ref)
    # at ordinal 0: a trace carries it to every later token (torch's blocked scan would also
    # smear a NaN backwards through its 0-weights, which the kernel rightly does not)
    rows["logp"][0, 0] = float("nan")
    c = Computed(rows, cfg)
    assert torch.isnan(c.tokens[0][0, 0]) and torch.isnan(c.parts[0]).any(), "phase D: the NaN was dropped"
    c.assert_ok(check_coef=False)  # the gradient at a NaN token is NaN in torch and 0 in the kernel


def test_beta0_overflowing_kl_fused_vocab_path():
    """End to end through the fused schedule (no ratio trace): the gradient comes from the
    fused vocab kernel, not the row kernel."""
    V = 5
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, V, generator=g)
    tokens = torch.randint(0, V, (2, 3), generator=g)
    logits[0, 1] = 0.0
    logits[0, 1, tokens[0, 1]] = -100.0  # logp ~ -101.6 for that token
    ref = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    ref[0, 1] = -1.0
    x = logits.clone().requires_grad_(True)
    out = lg.grpo_loss(x, tokens, torch.ones(2, 3, dtype=torch.bool), torch.tensor([1.0, -1.0]), group_size=2,
                       ref_logp=ref, config=lg.LossConfig(aggregation="dapo", beta=0.0), backend="triton")
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isinf(out.metrics["kl_mean"])
    assert torch.isfinite(x.grad).all(), "dlogits of the fused vocab kernel"


def test_kernel_codes_come_from_one_table():
    """The kernels' integer codes (lambda_grpo/kernels/_config.py) cover every name LossConfig
    accepts, and a name without a code is refused at launch with a ValueError naming the argument,
    never run as another surrogate (issue 17 point 5)."""
    from lambda_grpo.config import KL_ESTIMATORS, SURROGATES, TRACE_STYLES
    from lambda_grpo.kernels import _config

    assert set(_config.SURROGATE_CODES) == set(SURROGATES)
    assert set(_config.KL_CODES) == set(KL_ESTIMATORS)
    assert set(_config.TRACE_CODES) == set(TRACE_STYLES)
    assert len(set(_config.SURROGATE_CODES.values())) == len(SURROGATES)  # no two names share a code
    rows = make_rows(("holes",), T=6, seed=3)
    cfg = _cfg()
    consts = Computed(rows, cfg).res["base"][1]
    for arg, bad in (("surrogate", "ppo2"), ("kl_estimator", "k4")):
        with pytest.raises(ValueError, match=rf"^{arg}: expected one of"):
            _launch(rows, cfg, consts, **{arg: bad})
