"""Launch configurations for every kernel, in one place.

Each kernel has exactly the specialisations listed by `specialisations()`: the AOT compile
test and `python -m bench.kernels` compile that list, so a config the launcher can pick is a
config that has been compiled for sm_80 and sm_90. Hyper-parameters (eps, beta, tau, a, r,
entropy_coef, dual_clip) are runtime scalars: changing them never recompiles.
Compile-time flags are only the ones that change the loop structure (entropy accumulation,
trace style) plus the logits dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..config import KL_ESTIMATORS, SURROGATES, TRACE_STYLES

# One vocab tile for every V: 4096 fp32 lanes over 8 warps = 16 values per thread per live
# tensor, which keeps the entropy variants well below the spill point (see docs/kernels.md).
# Tiles are masked, so any V (1, 7, 32000, 151936) works; tiny V wastes lanes, which only
# tests see.
VOCAB_BLOCK = 4096
VOCAB_WARPS = 8
# Row kernel: one program per row, T in chunks of 128 (one value per thread at 4 warps);
# its cost is O(B*T), negligible next to the vocab passes.
ROW_BLOCK_T = 128
ROW_WARPS = 4
# The row kernel's finish (loss and metric means from the per-row sums): one program over B in
# chunks of 128 rows.
FINISH_BLOCK_B = 128
FINISH_WARPS = 4
# ... and from the tokens' terms of the fused schedule: one program over N in chunks of 1024, 8
# warps (4 tokens per thread: 8 float64 accumulators each stay well inside the register file)
FINISH_BLOCK_N = 1024
FINISH_TOKENS_WARPS = 8
# λ-GRPO group weights: one program per row over its group's G lengths, G <= MAX_GROUP_BLOCK
# (larger groups fall back to the torch function); a handful of float64 flops per length.
MAX_GROUP_BLOCK = 256
GROUP_WARPS = 1

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The kernels' integer codes of the config's names: the one table. The kernels compare against the
# tl.constexpr copies made from it (lambda_grpo/kernels/_tokenmath.py), a code no branch knows gives
# NaN there, and `code()` refuses a name without a code at launch.
TRACE_CODES = {None: 0, "recent": 1, "both": 2}
KL_CODES = {"k1": 1, "k2": 2, "k3": 3}
SURROGATE_CODES = {"clip": 0, "cispo": 1, "sapo": 2, "vespo": 3, "cispo_two_sided": 4}


def _check_tables() -> None:
    """Every name of lambda_grpo.config has a code (a new surrogate or KL estimator added there and
    not here fails at import, not silently in a kernel)."""
    for what, names, table in (("surrogate", SURROGATES, SURROGATE_CODES), ("kl_estimator", KL_ESTIMATORS, KL_CODES),
                               ("trace", TRACE_STYLES, TRACE_CODES)):
        if set(names) != set(table):
            raise ImportError(f"lambda_grpo.kernels._config: {what} codes {sorted(map(str, table))} do not match "
                              f"LossConfig's {sorted(map(str, names))}")


_check_tables()


def code(table: dict, name: str, value) -> int:
    """The kernel code of `value` (a ValueError naming the argument when it has none)."""
    if value not in table:
        raise ValueError(f"{name}: expected one of {tuple(table)}, got {value!r}")
    return table[value]


@dataclass(frozen=True)
class Launch:
    """One kernel launch's compile-time choices: constexpr values, num_warps, num_stages."""

    constexprs: tuple  # ((name, value), ...) sorted, hashable
    num_warps: int
    num_stages: int = 1

    def __post_init__(self):
        # the launch keywords, made once (every launch asks for them)
        object.__setattr__(self, "_kw", dict(self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages))

    def kwargs(self) -> dict:
        """The launch keywords, to be unpacked (`**launch.kwargs()`), never changed: one dict per Launch."""
        return self._kw


@lru_cache(maxsize=None)
def _launch_of(num_warps: int, constexprs: tuple) -> Launch:
    return Launch(tuple(sorted(constexprs)), num_warps)


def _launch(num_warps: int, **constexprs) -> Launch:
    return _launch_of(num_warps, tuple(constexprs.items()))


# Every launcher asks for its Launch on every call: cached by the values it depends on (the module
# constants included, so that a test that changes a block size gets its own Launch).
@lru_cache(maxsize=None)
def _vocab(with_entropy: bool, block: int, warps: int) -> Launch:
    return _launch(warps, BLOCK_V=block, WITH_ENTROPY=with_entropy)


def vocab_launch(with_entropy: bool) -> Launch:
    """Forward, fused and backward vocab kernels."""
    return _vocab(bool(with_entropy), VOCAB_BLOCK, VOCAB_WARPS)


def scale_launch() -> Launch:
    return _launch(VOCAB_WARPS, BLOCK_V=VOCAB_BLOCK)


@lru_cache(maxsize=None)
def _rows(trace, block: int, warps: int) -> Launch:
    return _launch(warps, BLOCK_T=block, TRACE=TRACE_CODES[trace])


def row_launch(trace) -> Launch:
    """trace: None / "recent" / "both" for ratio-mode traces (weight mode runs as trace None)."""
    return _rows(trace, ROW_BLOCK_T, ROW_WARPS)


def finish_launch() -> Launch:
    return _launch(FINISH_WARPS, BLOCK_B=FINISH_BLOCK_B)


def finish_tokens_launch() -> Launch:
    return _launch(FINISH_TOKENS_WARPS, BLOCK_N=FINISH_BLOCK_N)


def group_launch(group_size: int):
    """The group-weights kernel's launch for groups of `group_size` rows, or None beyond
    MAX_GROUP_BLOCK. BLOCK_G is the next power of two: one compiled variant per power."""
    block = 1
    while block < group_size:
        block *= 2
    if block > MAX_GROUP_BLOCK:
        return None
    return _launch(GROUP_WARPS, BLOCK_G=block)


def specialisations():
    """Every (kernel name, signature-dtype choices, Launch) the launchers can pick.

    Yields (kernel, logits_dtype or None, Launch). Used by the AOT test and bench/kernels.py.
    """
    for dt in LOGITS_DTYPES:
        for ent in (False, True):
            yield "vocab_fwd", dt, vocab_launch(ent)
            yield "vocab_fused", dt, vocab_launch(ent)
            yield "vocab_bwd", dt, vocab_launch(ent)
        yield "scale", dt, scale_launch()
    for tr in (None, "recent", "both"):
        yield "rows", None, row_launch(tr)
    yield "finish", None, finish_launch()
    yield "finish_tokens", None, finish_tokens_launch()
    block = 1
    while block <= MAX_GROUP_BLOCK:
        yield "groups", None, group_launch(block)
        block *= 2
