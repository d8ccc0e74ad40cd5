"""lambda_grpo inside verl 0.9.1 (issue 11 point 2): lambda_grpo/integrations/verl.py.

What is checked, and why:
- importing the module without verl never fails and imports nothing but lambda_grpo (verl loads
  plug-ins in every Ray worker and swallows their import errors);
- Tier 1 parity: the registered "lambda_grpo" policy loss, found through verl's own registry,
  equals verl's `vanilla` (dual clip at clip_ratio_c, clip-higher, clipping and the dual clip
  both active) for all five loss_agg_modes (token-mean, seq-mean-token-mean,
  seq-mean-token-sum-norm, seq-mean-token-sum, token-sum), with the local counts
  (global_batch_info empty) and with dp_size = 2 global counts, with and without
  rollout_is_weights: loss, d(loss)/d(logp) and vanilla's metrics; likewise "lambda_grpo_cispo"
  against verl's `cispo` (two-sided, both bounds binding on this batch), "lambda_grpo_sapo"
  against verl's `sapo` (temperatures off the defaults) and "lambda_grpo_gspo" against verl's
  `gspo` (sequence-level ratio; advantages and IS weights constant along rows, where the two
  agree; varying ones refused);
- the same through verl's whole actor loss `ppo_loss` (TensorDict batch, unpadded model output,
  KL and entropy added by verl), and the typed config (`omega_conf_to_dataclass` of the generated
  actor yaml with policy_loss._target_ = LambdaGRPOPolicyLossConfig) reaching the loss;
- the refusals (an unknown mode, a missing loss_scale_factor or global count, a config class
  whose fields the chosen loss_mode would ignore);
- the entry point: a plain `import verl` in a fresh process registers "lambda_grpo", and a built
  wheel ships the module and the entry point;
- Tier 2 pieces: group lengths from uid; LambdaState's gradient accumulated over micro-batches and
  averaged over 2 gloo processes equals one process's full-batch step, λ identical on both
  ranks; the λ-GRPO actor loss at λ = 0 equals verl's ppo_loss (token-mean, KL, entropy).

verl is installed without its dependencies (`make test` does it, see the Makefile): ray is not
there, so the verl imports run with a stub `ray` module (verl only touches `ray.ObjectRef` at
import time), removed from sys.modules again afterwards. The tests that need verl are skipped
with the reason when it cannot be imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import lambda_grpo as lg

REPO = Path(__file__).resolve().parent.parent
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "seq-mean-token-sum", "token-sum")
# the other registered losses, each with the actor-config fields of verl's loss of that name:
# cispo's bounds [1 - 0.05, 1 + 0.08] both bind on this batch (verl's two-sided clip);
# SAPO's temperatures are off the defaults
VARIANTS = {"cispo": dict(clip_ratio_low=0.05, clip_ratio_high=0.08), "sapo": dict(tau_pos=1.5, tau_neg=2.0),
            "gspo": dict(clip_ratio_low=0.1, clip_ratio_high=0.12)}
SKIP_REASON = ("verl is not importable (install it as `make test` does: pip install --no-deps verl==0.9.1 plus "
               "tensordict omegaconf hydra-core codetiming orjson pillow)")
RAY_STUB = textwrap.dedent("""
    import importlib.util, sys, types
    if importlib.util.find_spec("ray") is None:
        ray = types.ModuleType("ray"); ray.ObjectRef = type("ObjectRef", (), {}); sys.modules["ray"] = ray
""")


def _import_lv():
    """lambda_grpo.integrations.verl, imported (with verl where it is installed) under a ray stub."""
    stub = None
    if importlib.util.find_spec("ray") is None and importlib.util.find_spec("verl") is not None:
        stub = types.ModuleType("ray")
        stub.ObjectRef = type("ObjectRef", (), {})
        sys.modules["ray"] = stub
    try:
        lv = importlib.import_module("lambda_grpo.integrations.verl")
        if not lv.verl_available() and stub is not None:  # imported earlier without the stub
            lv = importlib.reload(lv)
        if lv.verl_available():
            for m in ("verl.workers.utils.losses", "verl.utils.config", "tensordict", "omegaconf"):
                importlib.import_module(m)
        return lv
    finally:
        if stub is not None and sys.modules.get("ray") is stub:
            del sys.modules["ray"]


@pytest.fixture(scope="module")
def lv():
    return _import_lv()


@pytest.fixture(scope="module")
def verl_mods(lv):
    if not lv.verl_available():
        pytest.skip(SKIP_REASON)
    from omegaconf import OmegaConf
    from tensordict import TensorDict

    from verl.trainer.ppo import core_algos
    from verl.utils import tensordict_utils
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import ActorConfig, PolicyLossConfig
    from verl.workers.utils.losses import ppo_loss

    return types.SimpleNamespace(core_algos=core_algos, ActorConfig=ActorConfig, PolicyLossConfig=PolicyLossConfig,
                                 ppo_loss=ppo_loss, TensorDict=TensorDict, tu=tensordict_utils, OmegaConf=OmegaConf,
                                 omega_conf_to_dataclass=omega_conf_to_dataclass)


# --------------------------------------------------------------------------------------------
# a batch where clipping (both sides) and the dual clip are active
# --------------------------------------------------------------------------------------------
B, T = 12, 16
LENGTHS = [16, 3, 9, 12, 1, 16, 7, 5, 0, 11, 14, 2]  # an empty row too: verl's seq modes skip it


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]
    old = -torch.rand(B, T, generator=g) * 2
    logp = old + 0.35 * torch.randn(B, T, generator=g)
    logp[::3, ::4] = old[::3, ::4] + 1.5  # ratio e^1.5 > clip_ratio_c = 3 where A < 0: the dual clip binds
    adv = torch.randn(B, generator=g)[:, None].expand(B, T).contiguous()
    weights = torch.rand(B, T, generator=g) * 1.5 + 0.25
    return dict(old=old, logp=logp, mask=mask, adv=adv, weights=weights)


def _actor_config(v, mode, loss_mode="vanilla", gbi=None, policy_loss=None, **kw):
    lsf = 20 if mode == "seq-mean-token-sum-norm" else None
    kw = dict(dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0), **kw)
    cfg = v.ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2, loss_agg_mode=mode,
                        loss_scale_factor=lsf, policy_loss=policy_loss or v.PolicyLossConfig(loss_mode=loss_mode), **kw)
    if gbi is not None:
        cfg.global_batch_info.update(gbi)
        cfg.global_batch_info["loss_scale_factor"] = lsf
    return cfg


def _gbi(dp, mask):
    if dp == 1:
        return {}
    # global counts that are not dp x the local ones, so that the normaliser is visible
    return dict(dp_size=dp, batch_num_tokens=int(mask.sum()) * dp - 7, global_batch_size=B * dp + 3)


def _policy_loss(v, name, b, mode, dp, weights, **kw):
    cfg = _actor_config(v, mode, gbi=_gbi(dp, b["mask"]), **kw)
    lp = b["logp"].clone().requires_grad_(True)
    fn = v.core_algos.get_policy_loss_fn(name)
    loss, metrics = fn(old_log_prob=b["old"], log_prob=lp, advantages=b["adv"], response_mask=b["mask"],
                       loss_agg_mode=mode, config=cfg, rollout_is_weights=b["weights"] if weights else None)
    loss.backward()
    return loss.detach(), lp.grad, metrics


def _grad_tol(g_ref) -> float:
    """|Δ dlogp| allowed: 5e-8, or one fp32 ulp of the largest entry where the gradient is not divided
    by a count (token-sum: entries up to ~9, where an ulp is 5e-7)."""
    return max(5e-8, 1.2e-7 * g_ref.abs().max().item())


def _digits(a: float, b: float) -> float:
    """Significant digits of agreement, relative to max(|a|, 0.1) (the issue's rule)."""
    d = abs(a - b) / max(abs(a), 0.1)
    return float("inf") if d == 0 else -np.log10(d)


# --------------------------------------------------------------------------------------------
# import without verl
# --------------------------------------------------------------------------------------------
def test_import_without_verl_never_fails_and_is_cheap(tmp_path):
    script = textwrap.dedent("""
        import sys
        sys.modules["verl"] = None          # verl not importable, whatever is installed
        import lambda_grpo
        before = set(sys.modules)
        import lambda_grpo.integrations.verl as lv
        new = sorted(m for m in set(sys.modules) - before if not m.startswith("lambda_grpo"))
        assert not lv.verl_available()
        assert new == [], new
        for name in ("LambdaState", "group_lengths_from_uid", "lambda_grpo_actor_loss",
                     "compute_policy_loss_lambda_grpo"):
            assert callable(getattr(lv, name))
        for thunk in (lambda: lv.LambdaGRPOPolicyLossConfig, lambda: lv.register(), lambda: lv.LambdaTrainingWorker,
                      lambda: lv.LambdaActorRolloutRefWorker):
            try:
                thunk()
            except ImportError as e:
                assert "needs verl" in str(e), e
            else:
                raise AssertionError("no ImportError")
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


# --------------------------------------------------------------------------------------------
# Tier 1: parity with verl's vanilla
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [False, True], ids=["no-is-weights", "is-weights"])
@pytest.mark.parametrize("dp", [1, 2], ids=["local-counts", "dp2"])
@pytest.mark.parametrize("mode", MODES)
def test_registered_loss_equals_vanilla(verl_mods, mode, dp, weights):
    b = _batch()
    l_ref, g_ref, m_ref = _policy_loss(verl_mods, "vanilla", b, mode, dp, weights)
    l_ours, g_ours, m_ours = _policy_loss(verl_mods, "lambda_grpo", b, mode, dp, weights)
    assert _digits(l_ref.item(), l_ours.item()) >= 6.5, (l_ref.item(), l_ours.item())
    assert (g_ref - g_ours).abs().max().item() <= _grad_tol(g_ref)
    assert set(m_ours) == set(m_ref)
    for k in m_ref:
        assert m_ours[k] == pytest.approx(m_ref[k], rel=1e-6, abs=1e-7), k
    # the cases are not degenerate: clipping and the dual clip act, the modes differ
    assert m_ref["actor/pg_clipfrac"] > 0.05 and m_ref["actor/pg_clipfrac_lower"] > 0


@pytest.mark.parametrize("weights", [False, True], ids=["no-is-weights", "is-weights"])
@pytest.mark.parametrize("dp", [1, 2], ids=["local-counts", "dp2"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_registered_variants_equal_verls(verl_mods, variant, mode, dp, weights):
    """lambda_grpo_cispo = verl's cispo (two-sided), lambda_grpo_sapo = verl's sapo (which
    aggregates seq-mean-token-mean whatever loss_agg_mode says): loss, dlogp, metrics."""
    b, kw = _batch(), VARIANTS[variant]
    if variant == "gspo":  # sequence-level IS weights: one per row (per-token ones are refused, below)
        b["weights"] = b["weights"][:, :1].expand(B, T).contiguous()
    l_ref, g_ref, m_ref = _policy_loss(verl_mods, variant, b, mode, dp, weights, **kw)
    l_ours, g_ours, m_ours = _policy_loss(verl_mods, f"lambda_grpo_{variant}", b, mode, dp, weights, **kw)
    assert _digits(l_ref.item(), l_ours.item()) >= 6.5, (l_ref.item(), l_ours.item())
    assert (g_ref - g_ours).abs().max().item() <= _grad_tol(g_ref)
    assert set(m_ours) == set(m_ref)
    for k in m_ref:
        assert m_ours[k] == pytest.approx(m_ref[k], rel=1e-6, abs=1e-7), k
    if variant in ("cispo", "gspo"):
        assert m_ref["actor/pg_clipfrac"] > 0.05  # the cap / the clip binds


def test_modes_and_normalisers_matter(verl_mods):
    b = _batch()
    losses = {(m, dp): _policy_loss(verl_mods, "lambda_grpo", b, m, dp, False)[0].item()
              for m in MODES for dp in (1, 2)}
    assert len({round(x, 6) for x in losses.values()}) == len(losses)


def test_traces_and_adv_clamp_reach_the_loss(verl_mods, lv):
    """The typed options change the loss exactly as LossConfig says (the registered loss equals a
    direct grpo_loss_from_logprobs call with the mapped config)."""
    v, b = verl_mods, _batch()
    pl = lv.LambdaGRPOPolicyLossConfig(trace="both", trace_decay=0.9, trace_mode="ratio", adv_clamp_min=-0.1)
    cfg = _actor_config(v, "token-mean", policy_loss=pl, gbi=_gbi(2, b["mask"]))
    lp = b["logp"].clone().requires_grad_(True)
    loss, _ = v.core_algos.get_policy_loss_fn("lambda_grpo")(old_log_prob=b["old"], log_prob=lp, advantages=b["adv"],
                                                            response_mask=b["mask"], loss_agg_mode="token-mean",
                                                            config=cfg)
    want = lg.grpo_loss_from_logprobs(b["logp"], b["mask"], b["adv"], 1, old_logp=b["old"], config=lg.LossConfig(
        aggregation="dapo", eps_low=0.2, eps_high=0.28, dual_clip=3.0, trace="both", trace_decay=0.9,
        adv_clamp_min=-0.1), num_tokens=(int(b["mask"].sum()) * 2 - 7) / 2).loss
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    vanilla = _policy_loss(v, "vanilla", b, "token-mean", 2, False)[0]
    assert abs(loss.item() - vanilla.item()) > 1e-3


# --------------------------------------------------------------------------------------------
# Tier 1: through verl's ppo_loss and the typed config
# --------------------------------------------------------------------------------------------
P = 4


def _ppo_data(v, seed=0, dp=2, extra=None):
    """A verl actor micro-batch: padded prompts/responses, the unpadded model output (one flat
    tensor over prompt + response tokens, shifted by one as verl's)."""
    g = torch.Generator().manual_seed(seed)
    plen = torch.tensor([4, 2, 3, 4, 1, 2, 3, 4])
    rlen = torch.tensor([10, 3, 7, 1, 6, 9, 10, 4])
    n, Tr = len(plen), 10
    pm = (torch.arange(P)[None] >= (P - plen)[:, None]).long()
    rm = (torch.arange(Tr)[None] < rlen[:, None]).long()
    lp = -torch.rand(n, Tr, generator=g) * 2
    total = int((plen + rlen).sum())
    flat_lp, flat_h = torch.randn(total, generator=g), torch.rand(total, generator=g)
    off = 0
    for i in range(n):
        s = off + int(plen[i]) - 1
        flat_lp[s:s + int(rlen[i])] = lp[i, :rlen[i]]
        off += int(plen[i] + rlen[i])
    old = lp + 0.3 * torch.randn(n, Tr, generator=g)
    old[::2, 1] = lp[::2, 1] - 1.5
    tensors = {"prompts": torch.zeros(n, P, dtype=torch.long), "responses": torch.zeros(n, Tr, dtype=torch.long),
               "attention_mask": torch.cat([pm, rm], 1), "response_mask": rm, "old_log_probs": old,
               "advantages": torch.randn(n, generator=g)[:, None].expand(n, Tr).contiguous(),
               "ref_log_prob": lp + 0.2 * torch.randn(n, Tr, generator=g)}
    tensors.update(extra or {})
    data = v.TensorDict(tensors, batch_size=[n])
    v.tu.assign_non_tensor(data, dp_size=dp, batch_num_tokens=int(rm.sum()) * dp - 3, global_batch_size=n * dp)
    return data, flat_lp, flat_h


def _run_ppo_loss(v, cfg, data, flat_lp, flat_h, loss_fn=None, **kw):
    x, h = flat_lp.clone().requires_grad_(True), flat_h.clone().requires_grad_(True)
    loss, metrics = (loss_fn or v.ppo_loss)(cfg, {"log_probs": x, "entropy": h}, data, **kw)
    loss.backward()
    return loss.detach(), x.grad, h.grad, metrics


@pytest.mark.parametrize("mode", MODES)
def test_ppo_loss_with_kl_and_entropy_equals_vanilla(verl_mods, mode):
    v = verl_mods
    data, flat_lp, flat_h = _ppo_data(v)
    kw = dict(use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=0.05, entropy_coeff=0.01)
    ref = _run_ppo_loss(v, _actor_config(v, mode, "vanilla", **kw), data, flat_lp, flat_h)
    ours = _run_ppo_loss(v, _actor_config(v, mode, "lambda_grpo", **kw), data, flat_lp, flat_h)
    assert _digits(ref[0].item(), ours[0].item()) >= 6.5
    assert (ref[1] - ours[1]).abs().max().item() <= 5e-8
    assert (ref[2] - ours[2]).abs().max().item() == 0  # the entropy term is verl's own
    assert ref[3]["kl_loss"].values == ours[3]["kl_loss"].values


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ppo_loss_with_variants_equals_verls(verl_mods, variant, mode):
    """lambda_grpo_cispo / lambda_grpo_sapo through verl's whole actor loss (KL, entropy, dp_size = 2)."""
    v = verl_mods
    data, flat_lp, flat_h = _ppo_data(v)
    kw = dict(use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=0.05, entropy_coeff=0.01, **VARIANTS[variant])
    ref = _run_ppo_loss(v, _actor_config(v, mode, variant, **kw), data, flat_lp, flat_h)
    ours = _run_ppo_loss(v, _actor_config(v, mode, f"lambda_grpo_{variant}", **kw), data, flat_lp, flat_h)
    assert _digits(ref[0].item(), ours[0].item()) >= 6.5
    assert (ref[1] - ours[1]).abs().max().item() <= 5e-8
    assert (ref[2] - ours[2]).abs().max().item() == 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_traces_reach_the_variants(verl_mods, lv, variant):
    """LambdaGRPOPolicyLossConfig's trace and adv_clamp_min reach lambda_grpo_cispo / _sapo: the loss is
    a direct grpo_loss_from_logprobs call with the mapped config, and differs from verl's own."""
    v, b = verl_mods, _batch()
    mode = "weight" if variant == "gspo" else "ratio"  # the sequence ratio takes no ratio-mode trace
    pl = lv.LambdaGRPOPolicyLossConfig(loss_mode=f"lambda_grpo_{variant}", trace="recent", trace_decay=0.9,
                                       trace_mode=mode, adv_clamp_min=-0.1)
    cfg = _actor_config(v, "seq-mean-token-mean", policy_loss=pl, gbi=_gbi(2, b["mask"]), **VARIANTS[variant])
    loss, _ = v.core_algos.get_policy_loss_fn(f"lambda_grpo_{variant}")(
        old_log_prob=b["old"], log_prob=b["logp"], advantages=b["adv"], response_mask=b["mask"],
        loss_agg_mode="seq-mean-token-mean", config=cfg)
    fields = {"cispo": dict(surrogate="cispo_two_sided", eps_low=0.05, eps_high=0.08),
              "sapo": dict(surrogate="sapo", sapo_tau_pos=1.5, sapo_tau_neg=2.0),
              "gspo": dict(importance_sampling="sequence", eps_low=0.1, eps_high=0.12)}[variant]
    want = lg.grpo_loss_from_logprobs(b["logp"], b["mask"], b["adv"], 1, old_logp=b["old"], config=lg.LossConfig(
        aggregation="grpo", trace="recent", trace_decay=0.9, trace_mode=mode, adv_clamp_min=-0.1, **fields),
        num_sequences=(B * 2 + 3) / 2).loss
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    plain = _policy_loss(v, variant, b, "seq-mean-token-mean", 2, False, **VARIANTS[variant])[0]
    assert abs(loss.item() - plain.item()) > 1e-3


def _actor_yaml(v):
    import verl

    root = v.OmegaConf.load(os.path.join(os.path.dirname(verl.__file__), "trainer/config/_generated_ppo_trainer.yaml"))
    root.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu = 2
    root.actor_rollout_ref.rollout.n = 4
    return root


def test_typed_config_from_the_actor_yaml(verl_mods, lv):
    """The path verl's worker takes (engine_workers.py: omega_conf_to_dataclass(config.actor)):
    the command-line overrides policy_loss._target_=...LambdaGRPOPolicyLossConfig,
    policy_loss.loss_mode=lambda_grpo, +policy_loss.trace=recent, +policy_loss.trace_decay=0.95."""
    v = verl_mods
    root = _actor_yaml(v)
    for key, val in (("_target_", "lambda_grpo.integrations.verl.LambdaGRPOPolicyLossConfig"),
                     ("loss_mode", "lambda_grpo"), ("trace", "recent"), ("trace_decay", 0.95)):
        v.OmegaConf.update(root, f"actor_rollout_ref.actor.policy_loss.{key}", val, force_add=True)
    actor = v.omega_conf_to_dataclass(root.actor_rollout_ref.actor)
    assert type(actor.policy_loss) is lv.LambdaGRPOPolicyLossConfig
    assert (actor.policy_loss.trace, actor.policy_loss.trace_decay) == ("recent", 0.95)
    data, flat_lp, flat_h = _ppo_data(v)
    loss = _run_ppo_loss(v, actor, data, flat_lp, flat_h)[0]
    # the same as a direct call with the mapped config (actor yaml: token-mean, clip 0.2/0.2, c = 3)
    padded = data.select("response_mask", "old_log_probs", "advantages").to_padded_tensor()
    from verl.workers.utils.padding import no_padding_2_padding

    want = lg.grpo_loss_from_logprobs(
        no_padding_2_padding(flat_lp, data), padded["response_mask"].bool(), padded["advantages"], 1,
        old_logp=padded["old_log_probs"], num_tokens=data["batch_num_tokens"] / data["dp_size"],
        config=lg.LossConfig(aggregation="dapo", dual_clip=3.0, trace="recent", trace_decay=0.95)).loss
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    # and the yaml's own loss (vanilla) differs: the trace was not dropped
    v.OmegaConf.update(root, "actor_rollout_ref.actor.policy_loss.trace", None)
    plain = v.omega_conf_to_dataclass(root.actor_rollout_ref.actor)
    assert abs(_run_ppo_loss(v, plain, data, flat_lp, flat_h)[0].item() - loss.item()) > 1e-4


# --------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------
def test_refusals(verl_mods, lv):
    v, b = verl_mods, _batch()
    fn = v.core_algos.get_policy_loss_fn("lambda_grpo")
    args = dict(old_log_prob=b["old"], log_prob=b["logp"], advantages=b["adv"], response_mask=b["mask"])
    cfg = v.ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2,
                        loss_agg_mode="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="needs actor.loss_scale_factor"):
        fn(**args, loss_agg_mode="seq-mean-token-sum-norm", config=cfg)
    with pytest.raises(ValueError, match="unknown loss_agg_mode"):
        fn(**args, loss_agg_mode="seq-mean", config=cfg)
    with pytest.raises(ValueError, match="needs the actor config"):
        fn(**args, loss_agg_mode="token-mean", config=None)
    for mode, key in (("token-mean", "batch_num_tokens"), ("seq-mean-token-mean", "global_batch_size")):
        cfg = _actor_config(v, mode, gbi={"dp_size": 2})
        with pytest.raises(ValueError, match=key):
            fn(**args, loss_agg_mode=mode, config=cfg)
    cfg = _actor_config(v, "token-mean", clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        fn(**args, loss_agg_mode="token-mean", config=cfg)
    with pytest.raises(ValueError, match="loss_mode: expected one of"):
        lv.LambdaGRPOPolicyLossConfig(loss_mode="vanilla", trace="recent")
    with pytest.raises(ValueError, match="tau_pos"):
        v.core_algos.get_policy_loss_fn("lambda_grpo_sapo")(**args, loss_agg_mode="token-mean",
                                                            config=_actor_config(v, "token-mean", tau_pos=0.0))
    # gspo: per-token advantages or IS weights (where verl's GSPO-token gradient differs from ours)
    gspo = v.core_algos.get_policy_loss_fn("lambda_grpo_gspo")
    cfg = _actor_config(v, "token-mean")
    with pytest.raises(ValueError, match="rollout_is_weights vary along a row"):
        gspo(**args, loss_agg_mode="token-mean", config=cfg, rollout_is_weights=b["weights"])
    with pytest.raises(ValueError, match="advantages vary along a row"):
        gspo(**dict(args, advantages=b["adv"] + torch.rand(B, T)), loss_agg_mode="token-mean", config=cfg)
    gspo(**args, loss_agg_mode="token-mean", config=cfg)  # row-constant advantages (GRPO's): fine
    with pytest.raises(ValueError, match="LossConfig.importance_sampling"):
        lv.LambdaGRPOPolicyLossConfig(loss_mode="lambda_grpo_gspo", trace="recent")
    with pytest.raises(ValueError, match="LossConfig.trace"):
        lv.LambdaGRPOPolicyLossConfig(trace="all")
    with pytest.raises(ValueError, match="LossConfig.trace_decay"):
        lv.LambdaGRPOPolicyLossConfig(trace="recent", trace_decay=1.5)


# --------------------------------------------------------------------------------------------
# entry point and wheel
# --------------------------------------------------------------------------------------------
def test_plain_import_verl_registers_the_loss(verl_mods, tmp_path):
    """A fresh process that only runs `import verl` (as every Ray worker does) has the loss: the
    entry point of the installed package is loaded by verl/__init__.py. Run outside the
    checkout, so that only the installed metadata is seen."""
    script = RAY_STUB + textwrap.dedent("""
        from importlib.metadata import entry_points
        eps = [(e.name, e.value) for e in entry_points(group="verl.plugins")]
        assert ("lambda_grpo", "lambda_grpo.integrations.verl") in eps, eps
        import verl
        from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
        for name in ("lambda_grpo", "lambda_grpo_cispo", "lambda_grpo_sapo", "lambda_grpo_gspo"):
            assert name in POLICY_LOSS_REGISTRY, sorted(POLICY_LOSS_REGISTRY)
        assert "lambda_grpo.integrations.verl" in sys.modules
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_wheel_ships_the_module_and_the_entry_point(tmp_path):
    """pyproject.toml lists its packages explicitly: an editable install would hide a missing one."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = tmp_path.glob("lambda_grpo-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        assert {"lambda_grpo/integrations/__init__.py", "lambda_grpo/integrations/verl.py"} <= names
        (ep,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        text = z.read(ep).decode()
    assert "[verl.plugins]" in text and "lambda_grpo = lambda_grpo.integrations.verl" in text


# --------------------------------------------------------------------------------------------
# Tier 2 pieces
# --------------------------------------------------------------------------------------------
def _groups(seed=0, n_groups=4, G=4, T_=12):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T_ + 1, (n_groups * G,), generator=g)
    perm = torch.randperm(n_groups * G, generator=g)  # rows of a group scattered, as after verl's balance_batch
    uid = np.array([f"prompt-{int(i) // G}" for i in perm], dtype=object)
    lengths = lengths[perm]
    mask = torch.arange(T_)[None] < lengths[:, None]
    return uid, mask, perm


def test_group_lengths_from_uid(lv):
    uid, mask, perm = _groups()
    gl, gi = lv.group_lengths_from_uid(uid, mask)
    n = mask.sum(1)
    assert gl.shape == (16, 4) and gi.dtype == torch.long
    assert torch.equal(gl.gather(1, gi[:, None]).squeeze(1), n)
    for i in range(16):  # row i's group is exactly the rows with its uid, in row order
        rows = [j for j in range(16) if uid[j] == uid[i]]
        assert gl[i].tolist() == [int(n[j]) for j in rows] and rows[int(gi[i])] == i
    # integer uids as a tensor give the same; unequal groups are refused
    codes = torch.tensor([int(u.split("-")[1]) for u in uid])
    gl2, gi2 = lv.group_lengths_from_uid(codes, mask)
    assert torch.equal(gl, gl2) and torch.equal(gi, gi2)
    with pytest.raises(ValueError, match="same number of rows"):
        lv.group_lengths_from_uid(uid[:-1], mask[:-1])
    # the result is what grpo_loss_from_logprobs validates and uses
    out = lg.grpo_loss_from_logprobs(torch.randn(16, 12), mask, torch.randn(16), 4, lam=torch.tensor(0.5),
                                     group_lengths=gl, group_index=gi)
    assert torch.isfinite(out.loss)


def _lambda_batch(seed=1):
    uid, mask, _ = _groups(seed)
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(mask.shape, generator=g) * 2
    logp = old + 0.3 * torch.randn(mask.shape, generator=g)
    return uid, mask, old, logp, torch.randn(mask.shape[0], generator=g)


CFG2 = lg.LossConfig(aggregation="lambda_grpo", eps_high=0.28, dual_clip=3.0, trace="recent")


def test_lambda_state_accumulates_over_micro_batches(lv):
    """Rows of one group in different micro-batches: the λ gradients add up to the full batch's."""
    uid, mask, old, logp, adv = _lambda_batch()
    gl, gi = lv.group_lengths_from_uid(uid, mask)
    N = int(mask.sum())
    full = lv.LambdaState(init=0.4, lr=0.5)
    lg.grpo_loss_from_logprobs(logp, mask, adv, 4, old_logp=old, lam=full.lam, config=CFG2,
                               group_lengths=gl, group_index=gi).loss.backward()
    split = lv.LambdaState(init=0.4, lr=0.5)
    for rows in (torch.arange(0, 16, 3), torch.tensor([i for i in range(16) if i % 3])):
        lg.grpo_loss_from_logprobs(logp[rows], mask[rows], adv[rows], 4, old_logp=old[rows], lam=split.lam,
                                   config=CFG2, num_tokens=N, group_lengths=gl[rows],
                                   group_index=gi[rows]).loss.backward()
    assert split.lam.grad.item() == pytest.approx(full.lam.grad.item(), rel=1e-6)
    g = full.step()
    assert full.value == pytest.approx(0.4 - 0.5 * g) and full.lam.grad is None and full.steps == 1
    state = full.state_dict()
    fresh = lv.LambdaState()
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert fresh.value == full.value and fresh.lr == 0.5 and fresh.steps == 1
    assert lv.LambdaState(init=1.0).step() == 0.0  # no backward reached lambda: no move
    with pytest.raises(ValueError, match="LambdaState.lr"):
        lv.LambdaState(lr=float("nan"))


WORKER = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    sys.modules["verl"] = None  # the Tier 2 pieces need no verl
    import lambda_grpo as lg
    from lambda_grpo.integrations.verl import LambdaState, group_lengths_from_uid
    from tests.test_integration_verl import CFG2, _lambda_batch

    def run(r, P, init, out):
        dist.init_process_group("gloo", init_method=init, rank=r, world_size=P)
        uid, mask, old, logp, adv = _lambda_batch()
        gl, gi = group_lengths_from_uid(uid, mask)
        N = int(mask.sum())
        state = LambdaState(init=0.4, lr=0.5)
        rows = torch.arange(r, 16, P)                  # this rank's rows: every group spans both ranks
        grads = []
        for step in range(2):
            for mb in (rows[::2], rows[1::2]):         # two micro-batches per optimiser step
                lg.grpo_loss_from_logprobs(logp[mb], mask[mb], adv[mb], 4, old_logp=old[mb], lam=state.lam,
                                           config=CFG2, num_tokens=N / P, group_lengths=gl[mb],
                                           group_index=gi[mb]).loss.backward()
            grads.append(state.step())
        with open(os.path.join(out, f"rank{r}.json"), "w") as f:
            json.dump({"rank": r, "lam": state.lam.item(), "grads": grads}, f)
        dist.destroy_process_group()

    if __name__ == "__main__":
        out = sys.argv[1]
        # fork: the workers inherit the imports, and the first call's lazy ones (torch._dynamo, seconds
        # on 2 cores), made once here
        lg.grpo_loss_from_logprobs(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1), 1,
                                   config=CFG2, lam=torch.zeros(()))
        mp.start_processes(run, args=(2, "file://" + os.path.join(out, "rdzv"), out), nprocs=2, start_method="fork")
""")


@pytest.mark.slow
def test_lambda_state_two_processes_match_one(lv, tmp_path):
    """2 gloo processes, each with half of every group in 2 micro-batches and num_tokens = N / 2:
    after 2 optimiser steps λ is bit-identical on both ranks and equals one process's full-batch
    SGD steps."""
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(tmp_path / "worker.py"), str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert res[0]["lam"] == res[1]["lam"] and res[0]["grads"] == res[1]["grads"]
    uid, mask, old, logp, adv = _lambda_batch()
    gl, gi = lv.group_lengths_from_uid(uid, mask)
    one = lv.LambdaState(init=0.4, lr=0.5)
    for step in range(2):
        lg.grpo_loss_from_logprobs(logp, mask, adv, 4, old_logp=old, lam=one.lam, config=CFG2, group_lengths=gl,
                                   group_index=gi).loss.backward()
        assert res[0]["grads"][step] == pytest.approx(one.step(), rel=1e-6)
    assert res[0]["lam"] == pytest.approx(one.value, rel=1e-7)
    assert abs(one.value - 0.4) > 1e-3  # lambda moved


def _tier2_data(v, lv, seed=0):
    data, flat_lp, flat_h = _ppo_data(v, seed)
    rm = data["response_mask"]
    uid = np.array(["a", "b", "a", "b", "b", "a", "b", "a"], dtype=object)  # G = 4, groups interleaved
    gl, gi = lv.group_lengths_from_uid(uid, rm)
    data.set(lv.GROUP_LENGTHS_KEY, gl)
    data.set(lv.GROUP_INDEX_KEY, gi)
    return data, flat_lp, flat_h


def test_tier2_actor_loss_at_lambda_zero_equals_ppo_loss(verl_mods, lv):
    """λ-GRPO at λ = 0 is dapo: verl's ppo_loss (token-mean) with its KL and entropy terms."""
    from functools import partial

    v = verl_mods
    data, flat_lp, flat_h = _tier2_data(v, lv)
    kw = dict(use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=0.05, entropy_coeff=0.01)
    ref = _run_ppo_loss(v, _actor_config(v, "token-mean", "vanilla", **kw), data, flat_lp, flat_h)
    state = lv.LambdaState(init=0.0)
    fn = partial(lv.lambda_grpo_actor_loss, lam_state=state)
    ours = _run_ppo_loss(v, _actor_config(v, "token-mean", "vanilla", **kw), data, flat_lp, flat_h, loss_fn=fn)
    assert _digits(ref[0].item(), ours[0].item()) >= 6.5
    assert (ref[1] - ours[1]).abs().max().item() <= 5e-8
    assert (ref[2] - ours[2]).abs().max().item() <= 5e-9
    assert state.lam.grad is not None and state.lam.grad.item() != 0
    assert ours[3]["actor/lambda"].values == [0.0]
    # lambda != 0 changes the loss; a mode other than token-mean is refused
    state.load_state_dict({"lam": 2.0})
    moved = _run_ppo_loss(v, _actor_config(v, "token-mean", "vanilla", **kw), data, flat_lp, flat_h, loss_fn=fn)
    assert abs(moved[0].item() - ours[0].item()) > 1e-4
    with pytest.raises(ValueError, match="must be 'token-mean'"):
        _run_ppo_loss(v, _actor_config(v, "seq-mean-token-mean", **kw), data, flat_lp, flat_h, loss_fn=fn)
    with pytest.raises(ValueError, match="kl_loss_type 'abs'"):
        _run_ppo_loss(v, _actor_config(v, "token-mean", **dict(kw, kl_loss_type="abs")), data, flat_lp, flat_h,
                      loss_fn=fn)
    bare, _, _ = _ppo_data(v)
    with pytest.raises(ValueError, match="lg_group_lengths"):
        _run_ppo_loss(v, _actor_config(v, "token-mean", **kw), bare, flat_lp, flat_h, loss_fn=fn)


# --------------------------------------------------------------------------------------------
# issue 18, findings 2, 5 and 6: hostile inputs to the adapter
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lambda_grpo", "lambda_grpo_cispo", "lambda_grpo_sapo", "lambda_grpo_gspo"])
def test_response_mask_with_weights_is_refused(verl_mods, name):
    """A response_mask with values other than 0 and 1 is refused, naming response_mask (finding 2: it
    was binarised silently). verl's own actor loss passes `response_mask.to(bool)` to the policy
    loss, so only a direct call can bring such values; 0/1 in a float or integer mask still work,
    giving exactly the bool mask's loss."""
    v, b = verl_mods, _batch()
    fn = v.core_algos.get_policy_loss_fn(name)
    cfg = _actor_config(v, "token-mean", **VARIANTS.get(name.replace("lambda_grpo_", ""), {}))
    args = dict(old_log_prob=b["old"], log_prob=b["logp"], advantages=b["adv"], loss_agg_mode="token-mean",
                config=cfg)
    want = fn(response_mask=b["mask"], **args)[0]
    for dtype in (torch.float32, torch.int64):
        assert fn(response_mask=b["mask"].to(dtype), **args)[0].item() == want.item()
    weights = b["mask"] * 0.5
    for bad in (weights, b["mask"] * 2, torch.where(b["mask"], torch.nan, 0.0), -b["mask"].float()):
        with pytest.raises(ValueError, match=r"response_mask: expected 0/1 values .* got"):
            fn(response_mask=bad, **args)


@pytest.mark.parametrize("lr", [-0.1, -1e-9, float("inf")])
def test_lambda_state_refuses_a_negative_lr(lv, lr):
    """Finding 5: LambdaState(lr < 0) was accepted (LambdaGRPOConfig refuses a negative lambda_lr)."""
    with pytest.raises(ValueError, match=r"LambdaState.lr: expected a finite number >= 0"):
        lv.LambdaState(lr=lr)
    assert lv.LambdaState(lr=0.0).lr == 0.0


@pytest.mark.parametrize("name", ["lambda_grpo", "lambda_grpo_cispo", "lambda_grpo_sapo", "lambda_grpo_gspo"])
@pytest.mark.parametrize("arg", ["old_log_prob", "advantages", "response_mask", "rollout_is_weights"])
def test_mismatched_shapes_name_the_argument(verl_mods, name, arg):
    """Finding 6: with mismatched shapes lambda_grpo_gspo raised a raw torch RuntimeError; every
    registered loss now gives a ValueError naming verl's argument with the expected and actual shapes."""
    v, b = verl_mods, _batch()
    fn = v.core_algos.get_policy_loss_fn(name)
    args = dict(old_log_prob=b["old"], log_prob=b["logp"], advantages=b["adv"], response_mask=b["mask"],
                rollout_is_weights=b["weights"][:, :1].expand(B, T).contiguous())
    wrong = {"old_log_prob": torch.zeros(B, T + 1), "advantages": torch.zeros(B + 1, T),
             "response_mask": torch.ones(B, T + 1, dtype=torch.bool), "rollout_is_weights": torch.ones(B, T + 1)}
    args[arg] = wrong[arg]
    got = ", ".join(map(str, wrong[arg].shape))
    with pytest.raises(ValueError, match=rf"{arg}: expected shape .*\({B}, {T}\).* got \({got}\)"):
        fn(**args, loss_agg_mode="token-mean", config=_actor_config(v, "token-mean"))


def test_issue18_gspo_reproduction(verl_mods):
    """The issue's own case: advantages (B+1, T), rollout_is_weights (B, T+1), response_mask (B, T+1)."""
    v, b = verl_mods, _batch()
    gspo = v.core_algos.get_policy_loss_fn("lambda_grpo_gspo")
    with pytest.raises(ValueError, match="response_mask: expected shape"):
        gspo(old_log_prob=b["old"], log_prob=b["logp"], advantages=torch.zeros(B + 1, T),
             response_mask=torch.ones(B, T + 1, dtype=torch.bool), rollout_is_weights=torch.ones(B, T + 1),
             loss_agg_mode="token-mean", config=_actor_config(v, "token-mean"))


# --------------------------------------------------------------------------------------------
# λ-GRPO's options and LambdaState's step (issue 19; the worker itself: test_integration_verl_lambda.py)
# --------------------------------------------------------------------------------------------
def test_lambda_options_of_the_policy_loss_config(verl_mods, lv):
    v = verl_mods
    pl = lv.LambdaGRPOPolicyLossConfig()
    assert (pl.lambda_lr, pl.lambda_init) == (0.1, 0.0)
    for kw, match in ((dict(lambda_lr=-0.1), "lambda_lr: expected a finite number >= 0"),
                      (dict(lambda_lr=float("nan")), "lambda_lr"), (dict(lambda_init=float("inf")), "lambda_init"),
                      (dict(lambda_init=True), "lambda_init")):
        with pytest.raises(ValueError, match=match):
            lv.LambdaGRPOPolicyLossConfig(**kw)
    # the recipe's command line: +actor_rollout_ref.actor.policy_loss.lambda_lr=0.05 (the path verl's worker takes)
    root = _actor_yaml(v)
    for key, val in (("_target_", "lambda_grpo.integrations.verl.LambdaGRPOPolicyLossConfig"),
                     ("loss_mode", "lambda_grpo"), ("lambda_lr", 0.05), ("lambda_init", 0.25)):
        v.OmegaConf.update(root, f"actor_rollout_ref.actor.policy_loss.{key}", val, force_add=True)
    actor = v.omega_conf_to_dataclass(root.actor_rollout_ref.actor)
    assert (actor.policy_loss.lambda_lr, actor.policy_loss.lambda_init) == (0.05, 0.25)


def test_lambda_options_without_the_worker_warn(verl_mods, lv):
    """The registered policy losses have no λ: λ options set off their defaults there warn (once)."""
    v, b = verl_mods, _batch()
    fn = v.core_algos.get_policy_loss_fn("lambda_grpo")
    args = dict(old_log_prob=b["old"], log_prob=b["logp"], advantages=b["adv"], response_mask=b["mask"],
                loss_agg_mode="token-mean")
    lv._WARNED_LAMBDA.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(**args, config=_actor_config(v, "token-mean", policy_loss=lv.LambdaGRPOPolicyLossConfig()))
    with pytest.warns(UserWarning, match="needs lambda_grpo.integrations.verl.LambdaTrainingWorker"):
        fn(**args, config=_actor_config(v, "token-mean", policy_loss=lv.LambdaGRPOPolicyLossConfig(lambda_init=0.5)))
    lv._WARNED_LAMBDA.clear()


def test_lambda_state_step_scale_and_skip(lv):
    """One process: step() divides by the loss scale, skips (clearing the gradient) when told to or
    when the gradient is not finite, refuses a bad scale."""
    s = lv.LambdaState(init=1.0, lr=0.5)
    s.lam.grad = torch.tensor(3.0 * 1024, dtype=torch.float64)
    assert s.step(scale=1024.0) == 3.0 and s.value == 1.0 - 0.5 * 3.0 and s.steps == 1 and not s.last_skipped
    s.lam.grad = torch.tensor(2.0, dtype=torch.float64)
    assert s.step(skip=True) == 2.0 and s.value == -0.5 and s.steps == 1 and s.last_skipped and s.lam.grad is None
    s.lam.grad = torch.tensor(float("inf"), dtype=torch.float64)
    s.step()
    assert s.value == -0.5 and s.last_skipped
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="scale: expected a finite number > 0"):
            s.step(scale=bad)
