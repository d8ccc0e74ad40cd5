"""docs/math.md §10: every bad input raises ValueError naming the argument, with expected vs actual.

Each case is (a function that makes the bad call, the argument name the message must start
with, a fragment of the actual value the message must show). Device rules are exercised with
the "meta" device, which needs no accelerator.
"""

from __future__ import annotations

import re

import pytest
import torch

import lambda_grpo as lg
from tests._compare import make_batch

B, T, V, G = 4, 5, 7, 2


@pytest.fixture(autouse=True)
def _host_value_checks():
    """The value rules (token range, 0/1 mask, group lengths) raise in the call under
    lg.check_values(); by default they make the loss NaN without a host read and report through
    LossOutput.input_errors (tests/test_value_rules.py). Here every rule is a raising check."""
    with lg.check_values():
        yield


def _inp(**over):
    inp = make_batch(B=B, T=T, V=V, G=G, dtype=torch.float32, seed=0, mask="holes")
    inp.update(over)
    return inp


def _call(backend="reference", config=None, lam=torch.tensor(0.0), **over):
    cfg = lg.LossConfig() if config is None else config
    return lg.grpo_loss(**_inp(**over), lam=lam, config=cfg, backend=backend)


def _module_call(config=None, backend="reference", **over):
    return lg.GRPOLoss(config, backend=backend)(**_inp(**over))


def _meta(x):
    return x.to("meta")


def _valid_tokens_with(value):
    inp = _inp()
    tok = inp["tokens"].clone()
    b, t = inp["mask"].nonzero()[0].tolist()
    tok[b, t] = value
    return tok


GRPO_LOSS_CASES = {
    # logits
    "logits not a tensor": (lambda: _call(logits=[[1.0]]), "logits", "list"),
    "logits 2-d": (lambda: _call(logits=torch.randn(B, V)), "logits", f"({B}, {V})"),
    "logits 4-d": (lambda: _call(logits=torch.randn(B, T, V, 1)), "logits", f"({B}, {T}, {V}, 1)"),
    "logits int": (lambda: _call(logits=torch.zeros(B, T, V, dtype=torch.long)), "logits", "int64"),
    "logits V=0": (lambda: _call(logits=torch.zeros(B, T, 0)), "logits", "0"),
    # tokens
    "tokens not a tensor": (lambda: _call(tokens=[[0] * T] * B), "tokens", "list"),
    "tokens shape": (lambda: _call(tokens=torch.zeros(B, T + 1, dtype=torch.long)), "tokens", f"({B}, {T + 1})"),
    "tokens float": (lambda: _call(tokens=torch.zeros(B, T)), "tokens", "float32"),
    "tokens bool": (lambda: _call(tokens=torch.zeros(B, T, dtype=torch.bool)), "tokens", "bool"),
    "tokens >= V": (lambda: _call(tokens=_valid_tokens_with(V)), "tokens", str(V)),
    "tokens < 0": (lambda: _call(tokens=_valid_tokens_with(-1)), "tokens", "-1"),
    "tokens device": (lambda: _call(tokens=_meta(_inp()["tokens"])), "tokens", "meta"),
    # mask
    "mask not a tensor": (lambda: _call(mask=[[1] * T] * B), "mask", "list"),
    "mask shape": (lambda: _call(mask=torch.ones(B, T - 1, dtype=torch.bool)), "mask", f"({B}, {T - 1})"),
    "mask value 2": (lambda: _call(mask=torch.full((B, T), 2)), "mask", "value 2 at index (0, 0)"),
    "mask value 0.5": (lambda: _call(mask=torch.full((B, T), 0.5)), "mask", "value 0.5 at index (0, 0)"),
    "mask value -1": (lambda: _call(mask=-torch.ones(B, T, dtype=torch.int32)), "mask", "value -1 at index (0, 0)"),
    "mask device": (lambda: _call(mask=_meta(_inp()["mask"])), "mask", "meta"),
    # advantages
    "advantages None": (lambda: _call(advantages=None), "advantages", "None"),
    "advantages not a tensor": (lambda: _call(advantages=[0.0] * B), "advantages", "list"),
    "advantages (B+1,)": (lambda: _call(advantages=torch.zeros(B + 1)), "advantages", f"({B + 1},)"),
    "advantages (B, T+1)": (lambda: _call(advantages=torch.zeros(B, T + 1)), "advantages", f"({B}, {T + 1})"),
    "advantages (T, B)": (lambda: _call(advantages=torch.zeros(T, B)), "advantages", f"({T}, {B})"),
    "advantages int": (lambda: _call(advantages=torch.zeros(B, dtype=torch.long)), "advantages", "int64"),
    "advantages device": (lambda: _call(advantages=torch.zeros(B, device="meta")), "advantages", "meta"),
    # old / ref log-probs
    "old_logp (B,)": (lambda: _call(old_logp=torch.zeros(B)), "old_logp", f"({B},)"),
    "old_logp shape": (lambda: _call(old_logp=torch.zeros(B, T + 2)), "old_logp", f"({B}, {T + 2})"),
    "old_logp int": (lambda: _call(old_logp=torch.zeros(B, T, dtype=torch.long)), "old_logp", "int64"),
    "old_logp device": (lambda: _call(old_logp=torch.zeros(B, T, device="meta")), "old_logp", "meta"),
    "ref_logp shape": (lambda: _call(ref_logp=torch.zeros(B + 1, T)), "ref_logp", f"({B + 1}, {T})"),
    "ref_logp int": (lambda: _call(ref_logp=torch.zeros(B, T, dtype=torch.int32)), "ref_logp", "int32"),
    "ref_logp not a tensor": (lambda: _call(ref_logp=1.0), "ref_logp", "float"),
    "beta > 0 without ref_logp": (lambda: _call(ref_logp=None, config=lg.LossConfig(beta=0.1)), "ref_logp", "None"),
    # group_size
    "group_size 0": (lambda: _call(group_size=0), "group_size", "0"),
    "group_size -2": (lambda: _call(group_size=-2), "group_size", "-2"),
    "group_size not dividing B": (lambda: _call(group_size=3), "group_size", "3"),
    "group_size > B": (lambda: _call(group_size=2 * B), "group_size", str(2 * B)),
    "group_size float": (lambda: _call(group_size=2.0), "group_size", "2.0"),
    "group_size bool": (lambda: _call(group_size=True), "group_size", "True"),
    "group_size None": (lambda: _call(group_size=None), "group_size", "None"),
    # lam
    "lambda_grpo without lam": (lambda: _call(lam=None), "lam", "None"),
    "lam shape (2,)": (lambda: _call(lam=torch.zeros(2)), "lam", "(2,)"),
    "lam int": (lambda: _call(lam=torch.tensor(1)), "lam", "int64"),
    "lam string": (lambda: _call(lam="0.5"), "lam", "str"),
    "lam device": (lambda: _call(lam=torch.tensor(0.0, device="meta")), "lam", "meta"),
    # normalisers
    "num_tokens 0": (lambda: _call(num_tokens=0), "num_tokens", "0"),
    "num_tokens negative": (lambda: _call(num_tokens=-3), "num_tokens", "-3"),
    "num_tokens string": (lambda: _call(num_tokens="10"), "num_tokens", "10"),
    "num_tokens tensor (2,)": (lambda: _call(num_tokens=torch.tensor([1.0, 2.0])), "num_tokens", "(2,)"),
    "num_sequences 0": (lambda: _call(num_sequences=0), "num_sequences", "0"),
    "num_sequences bool": (lambda: _call(num_sequences=True), "num_sequences", "True"),
    # config / backend
    "config not a LossConfig": (lambda: _call(config={"aggregation": "dapo"}), "config", "dict"),
    "backend unknown": (lambda: _call(backend="cuda"), "backend", "cuda"),
    "backend None": (lambda: _call(backend=None), "backend", "None"),
}


def _check(fn, name, actual):
    with pytest.raises(ValueError) as exc:
        fn()
    msg = str(exc.value)
    # the message names the argument first and says what was expected
    assert re.match(rf"^(LossConfig\.)?{re.escape(name)}\b", msg), msg
    assert "expected" in msg, msg
    assert actual in msg, f"{actual!r} not in {msg!r}"


@pytest.mark.parametrize("case", list(GRPO_LOSS_CASES))
def test_grpo_loss_bad_input(case):
    _check(*GRPO_LOSS_CASES[case])


_BACKEND_CASES = {
    "tokens >= V": dict(tokens=_valid_tokens_with(V)),
    "mask value 2": dict(mask=torch.full((B, T), 2)),
    "group_size not dividing B": dict(group_size=3),
    "beta > 0 without ref_logp": dict(ref_logp=None, config=lg.LossConfig(beta=0.1)),
    "logits 2-d": dict(logits=torch.randn(B, V)),
}


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("case", list(_BACKEND_CASES))
def test_grpo_loss_bad_input_other_backends(case, backend):
    # validation happens before dispatch: the same errors whatever the backend
    _, name, actual = GRPO_LOSS_CASES[case]
    _check(lambda: _call(backend=backend, **_BACKEND_CASES[case]), name, actual)


def test_valid_edge_inputs_are_accepted():
    # the boundaries of the rules are legal: trace_decay = 1, eps = 0, 0/1 int and float masks,
    # out-of-range ids where mask = 0, num_tokens as a 0-d tensor, lam as a 1-element tensor
    inp = _inp()
    tok = torch.where(inp["mask"], inp["tokens"], torch.full_like(inp["tokens"], V + 3))
    cfg = lg.LossConfig(trace="recent", trace_decay=1.0, eps_low=0.0, eps_high=0.0)
    for mask in (inp["mask"], inp["mask"].long(), inp["mask"].float()):
        out = lg.grpo_loss(**dict(inp, tokens=tok, mask=mask), lam=torch.tensor([0.5]), config=cfg,
                           num_tokens=torch.tensor(7.0), num_sequences=4, backend="reference")
        assert torch.isfinite(out.loss)


CONFIG_CASES = {
    "aggregation": ("ppo", "ppo"),
    "eps_low": (-0.1, "-0.1"),
    "eps_high": (-1.0, "-1.0"),
    "dual_clip": (1.0, "1.0"),
    "beta": (-0.01, "-0.01"),
    "kl_estimator": ("k4", "k4"),
    "temperature": (0.0, "0.0"),
    "entropy_coef": (float("nan"), "nan"),
    "length_r": (float("inf"), "inf"),
    "trace": ("forward", "forward"),
    "trace_decay": (0.0, "0.0"),
    "trace_mode": ("both", "both"),
    "adv_clamp_min": (float("nan"), "nan"),
    "max_completion_length": (0, "0"),
}
CONFIG_EXTRA = [
    ("temperature", -1.0, "-1.0"),
    ("temperature", "1", "'1'"),
    ("trace_decay", 1.5, "1.5"),
    ("trace_decay", -0.5, "-0.5"),
    ("dual_clip", 0.5, "0.5"),
    ("max_completion_length", 12.5, "12.5"),
    ("max_completion_length", True, "True"),
    ("eps_low", True, "True"),
]


@pytest.mark.parametrize("field, value, actual", [(k, v, a) for k, (v, a) in CONFIG_CASES.items()] + CONFIG_EXTRA)
def test_loss_config_bad_fields(field, value, actual):
    _check(lambda: lg.LossConfig(**{field: value}), field, actual)


def test_loss_config_is_frozen():
    cfg = lg.LossConfig()
    with pytest.raises(Exception):
        cfg.beta = 1.0  # type: ignore[misc]
    assert cfg.replace(beta=0.5).beta == 0.5 and cfg.beta == 0.0
    _check(lambda: cfg.replace(eps_low=-1.0), "eps_low", "-1.0")


@pytest.mark.parametrize("case", ["logits 2-d", "tokens >= V", "mask value 2", "advantages (B+1,)",
                                  "old_logp shape", "group_size not dividing B", "beta > 0 without ref_logp"])
def test_module_bad_input(case):
    over = {
        "logits 2-d": dict(logits=torch.randn(B, V)),
        "tokens >= V": dict(tokens=_valid_tokens_with(V)),
        "mask value 2": dict(mask=torch.full((B, T), 2)),
        "advantages (B+1,)": dict(advantages=torch.zeros(B + 1)),
        "old_logp shape": dict(old_logp=torch.zeros(B, T + 2)),
        "group_size not dividing B": dict(group_size=3),
        "beta > 0 without ref_logp": dict(ref_logp=None),
    }[case]
    _, name, actual = GRPO_LOSS_CASES[case]
    cfg = lg.LossConfig(beta=0.1) if case == "beta > 0 without ref_logp" else None
    _check(lambda: _module_call(config=cfg, **over), name, actual)


def test_module_bad_construction():
    _check(lambda: lg.GRPOLoss({"beta": 0.1}), "config", "dict")
    _check(lambda: lg.GRPOLoss(lg.LossConfig(), backend="gpu"), "backend", "gpu")


def _x():
    return torch.randn(B, T, V)


def _ids(*shape, **kw):
    return torch.zeros(*(shape or (B, T)), dtype=torch.long, **kw)


TOKEN_LOGPROBS_CASES = {
    # (N, V) logits with (N,) tokens are the packed layout (tests/test_packed.py)
    "logits 1-d": (lambda: lg.token_logprobs(torch.randn(V), _ids(1)), "logits", f"({V},)"),
    "logits 2-d, tokens 2-d": (lambda: lg.token_logprobs(torch.randn(B, V), _ids(B, T)), "tokens", f"({B}, {T})"),
    "logits int": (lambda: lg.token_logprobs(torch.zeros(B, T, V, dtype=torch.int32), _ids()), "logits", "int32"),
    "tokens shape": (lambda: lg.token_logprobs(_x(), _ids(B, T - 1)), "tokens", f"({B}, {T - 1})"),
    "tokens float": (lambda: lg.token_logprobs(_x(), torch.zeros(B, T)), "tokens", "float32"),
    "tokens >= V": (lambda: lg.token_logprobs(_x(), torch.full((B, T), V)), "tokens", str(V)),
    "tokens < 0": (lambda: lg.token_logprobs(_x(), torch.full((B, T), -2)), "tokens", "-2"),
    "tokens device": (lambda: lg.token_logprobs(_x(), _ids(device="meta")), "tokens", "meta"),
    "temperature 0": (lambda: lg.token_logprobs(_x(), _ids(), temperature=0.0), "temperature", "0.0"),
    "temperature negative": (lambda: lg.token_logprobs(_x(), _ids(), temperature=-1), "temperature", "-1"),
    "temperature nan": (lambda: lg.token_logprobs(_x(), _ids(), temperature=float("nan")), "temperature", "nan"),
    "backend": (lambda: lg.token_logprobs(_x(), _ids(), backend="fast"), "backend", "fast"),
}


@pytest.mark.parametrize("case", list(TOKEN_LOGPROBS_CASES))
def test_token_logprobs_bad_input(case):
    _check(*TOKEN_LOGPROBS_CASES[case])


GROUP_ADV_CASES = {
    "rewards not a tensor": (lambda: lg.group_advantages([1.0, 2.0], 2), "rewards", "list"),
    "rewards 2-d": (lambda: lg.group_advantages(torch.zeros(2, 2), 2), "rewards", "(2, 2)"),
    "group_size 0": (lambda: lg.group_advantages(torch.zeros(4), 0), "group_size", "0"),
    "group_size not dividing": (lambda: lg.group_advantages(torch.zeros(6), 4), "group_size", "4"),
    "group_size float": (lambda: lg.group_advantages(torch.zeros(4), 2.0), "group_size", "2.0"),
    "scale": (lambda: lg.group_advantages(torch.zeros(4), 2, scale="minmax"), "scale", "minmax"),
}


@pytest.mark.parametrize("case", list(GROUP_ADV_CASES))
def test_group_advantages_bad_input(case):
    _check(*GROUP_ADV_CASES[case])
