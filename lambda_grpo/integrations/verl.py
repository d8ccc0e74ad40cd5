"""lambda_grpo inside verl 0.9 (tested with verl 0.9.1; docs/integrations.md, "verl").

**Tier 1: registered policy losses.** Where verl is importable, importing this module registers
four losses with verl's ``register_policy_loss``, each verl's own loss of the same suffix computed
by :func:`lambda_grpo.grpo_loss_from_logprobs` from verl's config fields, plus GRPO-λ eligibility
traces and ``adv_clamp_min`` from :class:`LambdaGRPOPolicyLossConfig`:

- ``"lambda_grpo"``: verl's ``vanilla`` PPO loss (clip from ``clip_ratio_low``/``clip_ratio_high``,
  dual clip at ``clip_ratio_c``);
- ``"lambda_grpo_cispo"``: verl's ``cispo``, ``-sg(clip(ρ, 1 - clip_ratio_low, 1 +
  clip_ratio_high)) A log π``: ``LossConfig.surrogate = "cispo_two_sided"`` (verl clips on both
  sides; MiniMax-M1's and TRL's CISPO, ``surrogate="cispo"``, caps above only);
- ``"lambda_grpo_sapo"``: verl's ``sapo`` (soft gate, temperatures ``tau_pos``/``tau_neg`` of the
  actor config). As verl's ``sapo`` it always aggregates ``seq-mean-token-mean``, whatever
  ``loss_agg_mode`` says;
- ``"lambda_grpo_gspo"``: verl's ``gspo`` (the sequence-level ratio, ``LossConfig.importance_sampling
  = "sequence"``, clipped to [1 - clip_ratio_low, 1 + clip_ratio_high], no dual clip). verl's
  "GSPO-token" ratio sg(s_i)·π_t/sg(π_t) sends each token's gradient to its own log-prob, ours
  (TRL's) spreads it over the row's tokens; with a weight that is constant along each row (every
  aggregation here) the two gradients are the same exactly when the advantages and the
  ``rollout_is_weights`` are constant along each row (GRPO's, and verl's sequence-level IS):
  a row where they vary is refused with a ``ValueError``. verl also clamps the log sequence
  ratio at 10 where ours clamps at ±20 (a ratio above e^10 only).

``rollout_is_weights`` are per-token weights of the surrogate in all four. verl finds the
module by itself: the ``verl.plugins`` entry point in lambda-grpo's pyproject.toml makes every
process that runs ``import verl`` (every Ray worker) load it. Select a loss with
``actor_rollout_ref.actor.policy_loss.loss_mode=lambda_grpo`` (or ``lambda_grpo_cispo``,
``lambda_grpo_sapo``, ``lambda_grpo_gspo``). verl's ``loss_agg_mode`` maps to our aggregation, with verl's
``global_batch_info`` counts divided by ``dp_size`` (each rank's loss is averaged over the
data-parallel ranks):

==========================  ======================  ================================================
verl ``loss_agg_mode``      ours                    normaliser
==========================  ======================  ================================================
``token-mean``              ``dapo``                ``num_tokens = batch_num_tokens / dp_size``
``seq-mean-token-mean``     ``grpo``                ``num_sequences = global_batch_size / dp_size``
``seq-mean-token-sum-norm`` ``dr_grpo``             the same, and ``max_completion_length = loss_scale_factor``
``seq-mean-token-sum``      ``seq_mean_token_sum``  ``num_sequences = global_batch_size / dp_size``
``token-sum``               ``token_sum``           none; the loss times ``dp_size``, as verl's
==========================  ======================  ================================================

A count that is ``None`` (verl outside its trainer, or ``global_batch_info`` empty) means the
local count of the call, as verl's ``agg_loss`` does: the call's valid tokens for ``token-mean``,
its non-empty rows for the sequence modes; with ``dp_size > 1`` a missing count is an error, as
in verl. ``seq-mean-token-sum-norm`` needs ``actor.loss_scale_factor`` (verl's fallback, the
padded width of each micro-batch, changes from call to call). KL and entropy stay verl's: its
``ppo_loss`` adds them outside the policy loss with the same aggregation.

**Tier 2: λ-GRPO** (learnable λ, per-group length weights) needs what a policy-loss function is
never given: each row's group and a trained scalar outside the model. :class:`LambdaTrainingWorker`
(verl's ``TrainingWorker``, same constructor) is that: choosing it is choosing λ-GRPO. It installs
:func:`lambda_grpo_actor_loss` (the whole actor loss, λ's hyper-parameters ``lambda_lr`` and
``lambda_init`` from :class:`LambdaGRPOPolicyLossConfig`), writes each row's group from ``uid``
(:func:`group_lengths_from_uid` over the whole data-parallel batch) at the start of
``train_mini_batch``, steps :class:`LambdaState` (λ, its gradient averaged over the data-parallel
group) after every optimiser step on every rank, and saves / restores λ with verl's checkpoints.
:class:`LambdaActorRolloutRefWorker` is verl's ``ActorRolloutRefWorker`` with it as the actor.
Both are defined on first access (their verl module needs Ray), not at import. Tested on a CPU
through verl's real actor update in two gloo processes (tests/test_integration_verl_lambda.py);
verl's Ray trainer, which builds the worker class, was not run (docs/integrations.md, verl).

Importing this module never fails and stays cheap when verl is absent: only the verl names
(:class:`LambdaGRPOPolicyLossConfig`, :func:`register`, the two workers) need verl, and raise
``ImportError`` with the reason when it cannot be imported.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..api import grpo_loss_from_logprobs
from ..config import LOG_RATIO_CLAMP, LossConfig

__all__ = ["LOSS_NAME", "LOSS_NAMES", "AGG_MODES", "VERL_TESTED", "verl_available", "register",
           "compute_policy_loss_lambda_grpo", "compute_policy_loss_lambda_grpo_cispo",
           "compute_policy_loss_lambda_grpo_sapo", "compute_policy_loss_lambda_grpo_gspo", "loss_config_from_verl",
           "normalisers_from_verl",
           "group_lengths_from_uid", "LambdaState", "lambda_grpo_actor_loss", "GROUP_LENGTHS_KEY",
           "GROUP_INDEX_KEY"]  # + LambdaGRPOPolicyLossConfig with verl

VERL_TESTED = "0.9.1"
LOSS_NAME = "lambda_grpo"
# registered name -> the verl loss it computes
LOSS_NAMES = {LOSS_NAME: "vanilla", "lambda_grpo_cispo": "cispo", "lambda_grpo_sapo": "sapo",
              "lambda_grpo_gspo": "gspo"}
# verl loss -> the LossConfig fields that make it
VERL_LOSSES = {"vanilla": dict(surrogate="clip"), "cispo": dict(surrogate="cispo_two_sided"),
               "sapo": dict(surrogate="sapo"),
               "gspo": dict(surrogate="clip", importance_sampling="sequence")}
# verl loss_agg_mode -> our aggregation (docs/math.md §6)
AGG_MODES = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo",
             "seq-mean-token-sum": "seq_mean_token_sum", "token-sum": "token_sum"}
# verl's sapo aggregates so whatever loss_agg_mode is
SAPO_AGG_MODE = "seq-mean-token-mean"
# verl kl_loss_type -> our kl_estimator (Tier 2; verl's "abs", "full" and the "+" straight-through
# variants have no equivalent)
KL_ESTIMATORS = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
# per-row batch fields of each row's group (group_lengths_from_uid): LambdaTrainingWorker writes
# them from uid at the start of train_mini_batch
GROUP_LENGTHS_KEY = "lg_group_lengths"
GROUP_INDEX_KEY = "lg_group_index"
# λ's SGD rate by default, as lambda_grpo.trainer's TrainConfig.lambda_lr
LAMBDA_LR = 0.1
_DEFAULTS = LossConfig()  # the adapter's defaults are LossConfig's, never retyped
# λ's state in a verl checkpoint directory: one file per rank, next to verl's own shards
LAMBDA_CKPT = "lambda_grpo_world_size_{world}_rank_{rank}.json"


def _error(msg: str) -> ValueError:
    return ValueError(f"lambda_grpo in verl: {msg}")


def _get(cfg, key: str, default=None):
    """A field of a verl config: a BaseConfig dataclass, an omegaconf DictConfig or a dict."""
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _count(x, name: str):
    """A verl count: None, a positive number or a 1-element tensor (passed on as it is)."""
    if x is None or isinstance(x, torch.Tensor):
        return x
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or x <= 0:
        raise _error(f"global_batch_info[{name!r}]: expected None or a number > 0, got {x!r}")
    return x


# --------------------------------------------------------------------------------------------
# Tier 1: verl's config -> LossConfig and normalisers
# --------------------------------------------------------------------------------------------
def _map_mode(loss_agg_mode: str) -> str:
    if loss_agg_mode in AGG_MODES:
        return AGG_MODES[loss_agg_mode]
    raise _error(f"unknown loss_agg_mode {loss_agg_mode!r}; expected one of {sorted(AGG_MODES)}")


def _loss_scale_factor(config) -> int:
    gbi = _get(config, "global_batch_info") or {}
    lsf = gbi.get("loss_scale_factor")
    if lsf is None:
        lsf = _get(config, "loss_scale_factor")
    if lsf is None:
        raise _error("loss_agg_mode 'seq-mean-token-sum-norm' needs actor.loss_scale_factor (e.g. the maximum response "
                     "length): verl's fallback is the padded width of each micro-batch, which changes from call to "
                     "call, so the normaliser would not be a constant")
    if isinstance(lsf, bool) or not isinstance(lsf, numbers.Real) or not float(lsf).is_integer() or lsf < 1:
        raise _error(f"actor.loss_scale_factor: expected a positive integer, got {lsf!r}")
    return int(lsf)


def loss_config_from_verl(config, loss_agg_mode: str, *, aggregation: Optional[str] = None, beta: float = 0.0,
                          kl_estimator: str = "k3", entropy_coef: float = 0.0,
                          verl_loss: str = "vanilla") -> LossConfig:
    """The LossConfig equal to verl's policy loss ``verl_loss`` (``vanilla``, ``cispo``, ``sapo`` or
    ``gspo``) under ``config`` (an actor config).

    - vanilla: ``eps_low``/``eps_high`` from ``clip_ratio_low``/``clip_ratio_high`` (each falling back
      to ``clip_ratio``, as ``vanilla``), ``dual_clip = clip_ratio_c`` (``vanilla`` always
      dual-clips);
    - gspo: the same clip range, ``importance_sampling="sequence"``, no dual clip;
    - cispo: ``surrogate="cispo_two_sided"`` with the same clip range (verl's clip(ρ, 1 - low, 1 + high));
    - sapo: ``sapo_tau_pos/neg = tau_pos/tau_neg``; no clip.

    Traces and ``adv_clamp_min`` come from ``config.policy_loss`` (:class:`LambdaGRPOPolicyLossConfig`;
    a plain PolicyLossConfig means none), the aggregation is mapped from ``loss_agg_mode`` (or
    ``aggregation`` when given: Tier 2 passes "lambda_grpo"). β and the entropy bonus are 0: verl
    adds them outside the policy loss."""
    if aggregation is None:
        aggregation = _map_mode(loss_agg_mode)
    clip = _get(config, "clip_ratio", 0.2)
    low = _get(config, "clip_ratio_low")
    high = _get(config, "clip_ratio_high")
    low, high = float(clip if low is None else low), float(clip if high is None else high)
    pl = _get(config, "policy_loss")
    if verl_loss not in VERL_LOSSES:
        raise _error(f"verl_loss: expected one of {sorted(VERL_LOSSES)}, got {verl_loss!r}")
    fields = dict(aggregation=aggregation, eps_low=low, eps_high=high, **VERL_LOSSES[verl_loss])
    if verl_loss == "vanilla":
        fields["dual_clip"] = float(_get(config, "clip_ratio_c", 3.0))
    elif verl_loss == "sapo":
        fields.update(sapo_tau_pos=float(_get(config, "tau_pos", 1.0)),
                      sapo_tau_neg=float(_get(config, "tau_neg", 1.05)))
    fields.update(
        beta=float(beta), kl_estimator=kl_estimator, entropy_coef=float(entropy_coef),
        trace=_get(pl, "trace"), trace_decay=float(_get(pl, "trace_decay", _DEFAULTS.trace_decay)),
        trace_mode=_get(pl, "trace_mode", _DEFAULTS.trace_mode), adv_clamp_min=_get(pl, "adv_clamp_min"),
    )
    if fields["adv_clamp_min"] is not None:
        fields["adv_clamp_min"] = float(fields["adv_clamp_min"])
    if aggregation == "dr_grpo":
        fields["max_completion_length"] = _loss_scale_factor(config)
    try:
        return LossConfig(**fields)
    except ValueError as e:  # name verl's field, not ours
        raise _error(f"the actor config does not give a valid loss ({e}); clip_ratio_c is the dual clip and must be "
                     "> 1, tau_pos/tau_neg are SAPO's temperatures (> 0), the trace fields are those of "
                     "lambda_grpo.LossConfig") from e


def _dp_size(config) -> int:
    gbi = _get(config, "global_batch_info") or {}
    dp = gbi.get("dp_size", 1)
    dp = 1 if dp is None else dp
    if isinstance(dp, torch.Tensor):
        dp = int(dp.item())
    if isinstance(dp, bool) or not isinstance(dp, numbers.Integral) or dp < 1:
        raise _error(f"global_batch_info['dp_size']: expected a positive int, got {dp!r}")
    return int(dp)


def normalisers_from_verl(config, loss_agg_mode: str, response_mask: torch.Tensor) -> dict:
    """``num_tokens`` / ``num_sequences`` for our call from verl's ``config.global_batch_info``:
    the global counts divided by ``dp_size``; ``None`` counts mean the local ones (as verl's
    ``agg_loss``: valid tokens of the call, or its non-empty rows), refused with ``dp_size > 1``.
    ``token-sum`` has none (empty dict): verl multiplies that sum by ``dp_size`` instead, which the
    policy losses here do after the call."""
    gbi = _get(config, "global_batch_info") or {}
    dp = _dp_size(config)
    mode = _map_mode(loss_agg_mode)
    if mode == "token_sum":
        return {}
    if mode == "dapo":
        n = _count(gbi.get("batch_num_tokens"), "batch_num_tokens")
        if n is None:
            if dp > 1:
                raise _error("loss_agg_mode 'token-mean' with dp_size > 1 needs global_batch_info['batch_num_tokens']")
            return {"num_tokens": None}
        return {"num_tokens": n / dp}
    n = _count(gbi.get("global_batch_size"), "global_batch_size")
    if n is None:
        if dp > 1:
            raise _error(f"loss_agg_mode {loss_agg_mode!r} with dp_size > 1 needs "
                         "global_batch_info['global_batch_size']")
        # verl's local count: the rows with at least one valid token (kept on the device, no sync)
        return {"num_sequences": (response_mask.sum(dim=-1) > 0).sum().clamp_min(1)}
    return {"num_sequences": n / dp}


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(m, x, torch.zeros_like(x)).sum() / (m.sum() + 1e-8)


def _pg_metrics(out, log_prob, old_log_prob, advantages, mask, cfg: LossConfig) -> dict:
    """verl's ``vanilla`` metrics from the loss's own outputs: pg_clipfrac is our clip_frac;
    pg_clipfrac_lower the fraction of tokens whose surrogate the dual clip sets (the per-token
    `clip_dual` flag, A < 0 after ``adv_clamp_min``); ppo_kl the mean of old - logp."""
    with torch.no_grad():
        x = (log_prob.detach() - old_log_prob.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        vals = {"actor/pg_clipfrac": out.metrics["clip_frac"], "actor/ppo_kl": _masked_mean(-x, mask),
                "actor/pg_clipfrac_lower": _masked_mean(out.per_token["clip_dual"], mask)}
        return {k: float(v) for k, v in vals.items()}


def _pg_metrics_no_clip(out, log_prob, old_log_prob, mask, cfg: LossConfig, advantages) -> dict:
    """verl's ``cispo``, ``sapo`` and ``gspo`` metrics: pg_clipfrac the fraction of tokens whose ratio
    the clip changed (cispo: outside [1 - clip_ratio_low, 1 + clip_ratio_high], our clip_frac;
    gspo: the clipped term is the larger loss, i.e. A > 0 above 1 + high or A < 0 below 1 - low;
    sapo: 0), pg_clipfrac_lower 0, ppo_kl the mean of old - logp."""
    with torch.no_grad():
        x = (log_prob.detach() - old_log_prob.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        clipfrac = 0.0
        if cfg.surrogate in ("cispo_two_sided", "clip"):  # cispo; gspo (the clip flags of the row's ratio)
            clipfrac = float(out.metrics["clip_frac"])
        return {"actor/pg_clipfrac": clipfrac, "actor/ppo_kl": float(_masked_mean(-x, mask)),
                "actor/pg_clipfrac_lower": 0.0}


def _constant_along_rows(x: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether (B, T) x takes one value on the valid tokens of each row (one host sync)."""
    big = torch.finfo(x.dtype).max if x.dtype.is_floating_point else torch.iinfo(x.dtype).max
    hi = torch.where(mask, x, torch.full_like(x, -big)).amax(dim=-1)
    lo = torch.where(mask, x, torch.full_like(x, big)).amin(dim=-1)
    return bool(((hi == lo) | ~mask.any(dim=-1)).all())


def _check_gspo(advantages, rollout_is_weights, mask) -> None:
    for name, x in (("advantages", advantages), ("rollout_is_weights", rollout_is_weights)):
        if x is not None and x.dim() == 2 and not _constant_along_rows(x.detach(), mask):
            raise _error(f"loss_mode 'lambda_grpo_gspo': {name} vary along a row. verl's gspo sends each token's "
                         f"gradient to its own log-prob, lambda_grpo's sequence ratio spreads it over the row; the "
                         f"two agree only with {name} constant along each row (GRPO's advantages, sequence-level "
                         f"rollout IS): use verl's own loss_mode=gspo here")


def _check_shapes(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights) -> None:
    """verl's arguments, named as verl names them, before any arithmetic mixes them: log_prob is
    (B, T), old_log_prob, response_mask and rollout_is_weights the same, advantages (B, T) or (B,)."""
    if not isinstance(log_prob, torch.Tensor) or log_prob.dim() != 2:
        got = tuple(log_prob.shape) if isinstance(log_prob, torch.Tensor) else type(log_prob).__name__
        raise _error(f"log_prob: expected a (B, T) tensor, got {got}")
    B, T = log_prob.shape
    for name, x, shapes in (("old_log_prob", old_log_prob, [(B, T)]), ("response_mask", response_mask, [(B, T)]),
                            ("advantages", advantages, [(B, T), (B,)]),
                            ("rollout_is_weights", rollout_is_weights, [(B, T)])):
        if x is None and name == "rollout_is_weights":
            continue
        if not isinstance(x, torch.Tensor):
            raise _error(f"{name}: expected a tensor of shape {' or '.join(map(str, shapes))}, got "
                         f"{type(x).__name__}")
        if tuple(x.shape) not in shapes:
            raise _error(f"{name}: expected shape {' or '.join(map(str, shapes))} (log_prob is ({B}, {T})), got "
                         f"{tuple(x.shape)}")


def _bool_mask(response_mask: torch.Tensor) -> torch.Tensor:
    """response_mask as a bool mask; values other than 0 and 1 are refused (issue 18, finding 2).

    verl's own actor loss (``ppo_loss``) hands the policy loss ``response_mask.to(bool)``, so in a verl
    run the values are 0 and 1. Only a direct call can bring others, and there verl's own losses do
    not agree on what a weight would mean (``gspo`` weights its sequence log-ratio by it,
    ``seq-mean-token-mean`` divides each row by the summed weights, the λ-GRPO lengths count tokens);
    verl's channel for per-token weights is ``rollout_is_weights``, which these losses honour. A bool
    mask costs no check; any other dtype one host sync."""
    if response_mask.dtype == torch.bool:
        return response_mask
    bad = (response_mask != 0) & (response_mask != 1)
    if bool(bad.any()):
        example = response_mask[bad].flatten()[:3].tolist()
        raise _error(f"response_mask: expected 0/1 values (or a bool tensor), got {int(bad.sum())} other values, "
                     f"e.g. {example}. verl's ppo_loss passes response_mask.to(bool); pass per-token weights as "
                     "rollout_is_weights")
    return response_mask != 0


_WARNED_LAMBDA = []


def _warn_unused_lambda(pl) -> None:
    """λ's options on a registered policy loss, which has no λ: say once that they do nothing."""
    if _WARNED_LAMBDA or pl is None:
        return
    lr, init = _get(pl, "lambda_lr", LAMBDA_LR), _get(pl, "lambda_init", 0.0)
    if lr != LAMBDA_LR or init != 0.0:
        _WARNED_LAMBDA.append(True)
        warnings.warn(f"lambda_grpo in verl: policy_loss.lambda_lr={lr}, lambda_init={init} have no effect on the "
                      "registered policy losses (verl's vanilla, cispo, sapo, gspo); λ-GRPO needs "
                      "lambda_grpo.integrations.verl.LambdaTrainingWorker (docs/integrations.md, verl, λ-GRPO)",
                      stacklevel=3)


def _policy_loss(verl_loss: str, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights):
    if config is None:
        raise _error("the policy loss needs the actor config (config=None)")
    if verl_loss == "sapo":
        loss_agg_mode = SAPO_AGG_MODE
    _check_shapes(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights)
    mask = _bool_mask(response_mask)
    if verl_loss == "gspo":
        _check_gspo(advantages, rollout_is_weights, mask)
    cfg = loss_config_from_verl(config, loss_agg_mode, verl_loss=verl_loss)
    _warn_unused_lambda(_get(config, "policy_loss"))
    norms = normalisers_from_verl(config, loss_agg_mode, mask)
    out = grpo_loss_from_logprobs(log_prob, mask, advantages, 1, old_logp=old_log_prob, config=cfg,
                                  token_weights=rollout_is_weights, return_per_token=True, **norms)
    loss = out.loss
    if cfg.aggregation == "token_sum":  # verl: the local sum times dp_size (DP averages the gradients)
        dp = _dp_size(config)
        loss = loss * dp if dp != 1 else loss
    if verl_loss == "vanilla":
        return loss, _pg_metrics(out, log_prob, old_log_prob, advantages, mask, cfg)
    return loss, _pg_metrics_no_clip(out, log_prob, old_log_prob, mask, cfg, advantages)


def compute_policy_loss_lambda_grpo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                    response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                                    rollout_is_weights: Optional[torch.Tensor] = None):
    """verl policy loss ``"lambda_grpo"``: verl's ``vanilla`` (the signature of verl's
    ``PolicyLossFn``; verl calls it by keyword). Returns ``(pg_loss, metrics)`` with ``vanilla``'s
    metric names."""
    return _policy_loss("vanilla", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights)


def compute_policy_loss_lambda_grpo_cispo(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                                          advantages: torch.Tensor, response_mask: torch.Tensor,
                                          loss_agg_mode: str = "token-mean", config=None,
                                          rollout_is_weights: Optional[torch.Tensor] = None):
    """verl policy loss ``"lambda_grpo_cispo"``: verl's ``cispo`` (``surrogate="cispo_two_sided"``,
    the ratio clipped to [1 - clip_ratio_low, 1 + clip_ratio_high] and detached). Returns
    ``(pg_loss, metrics)`` with ``cispo``'s metric names."""
    return _policy_loss("cispo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights)


def compute_policy_loss_lambda_grpo_sapo(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                                         advantages: torch.Tensor, response_mask: torch.Tensor,
                                         loss_agg_mode: str = SAPO_AGG_MODE, config=None,
                                         rollout_is_weights: Optional[torch.Tensor] = None):
    """verl policy loss ``"lambda_grpo_sapo"``: verl's ``sapo`` (temperatures ``tau_pos``,
    ``tau_neg``), aggregated ``seq-mean-token-mean`` whatever ``loss_agg_mode`` is, as verl's.
    Returns ``(pg_loss, metrics)`` with ``sapo``'s metric names."""
    return _policy_loss("sapo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights)


def compute_policy_loss_lambda_grpo_gspo(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                                         advantages: torch.Tensor, response_mask: torch.Tensor,
                                         loss_agg_mode: str = "token-mean", config=None,
                                         rollout_is_weights: Optional[torch.Tensor] = None):
    """verl policy loss ``"lambda_grpo_gspo"``: verl's ``gspo`` (the sequence-level ratio, clip range
    ``clip_ratio_low``/``clip_ratio_high``), for advantages and ``rollout_is_weights`` constant along
    each row (refused otherwise: module docstring). Returns ``(pg_loss, metrics)`` with ``gspo``'s
    metric names."""
    return _policy_loss("gspo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights)


_LOSS_FNS = {LOSS_NAME: compute_policy_loss_lambda_grpo, "lambda_grpo_cispo": compute_policy_loss_lambda_grpo_cispo,
             "lambda_grpo_sapo": compute_policy_loss_lambda_grpo_sapo,
             "lambda_grpo_gspo": compute_policy_loss_lambda_grpo_gspo}


# --------------------------------------------------------------------------------------------
# verl-dependent names: the typed config and the registration
# --------------------------------------------------------------------------------------------
_VERL_ERROR: Optional[BaseException] = None
try:
    from verl.trainer.ppo.core_algos import register_policy_loss as _register_policy_loss
    from verl.workers.config import PolicyLossConfig as _PolicyLossConfig
except ImportError as e:  # verl absent (or not importable here): Tier 2 helpers still work
    _VERL_ERROR = e


def verl_available() -> bool:
    """Whether verl could be imported (and the losses of ``LOSS_NAMES`` were registered)."""
    return _VERL_ERROR is None


def _require_verl(what: str):
    if _VERL_ERROR is not None:
        raise ImportError(f"{what} needs verl (pip install 'lambda-grpo[verl]'; tested with verl {VERL_TESTED}), "
                          f"which could not be imported: {_VERL_ERROR}") from _VERL_ERROR


def register(name: str = LOSS_NAME, loss: Optional[str] = None):
    """Register one of our policy losses under ``name`` in verl's policy-loss registry: ``loss`` is
    one of ``LOSS_NAMES`` (default: ``name`` itself when it is one, else ``"lambda_grpo"``). Done for
    every name of ``LOSS_NAMES`` at import when verl is importable."""
    _require_verl("lambda_grpo.integrations.verl.register")
    loss = loss if loss is not None else (name if name in _LOSS_FNS else LOSS_NAME)
    if loss not in _LOSS_FNS:
        raise _error(f"register: loss must be one of {sorted(_LOSS_FNS)}, got {loss!r}")
    return _register_policy_loss(name)(_LOSS_FNS[loss])


if _VERL_ERROR is None:
    @dataclass
    class LambdaGRPOPolicyLossConfig(_PolicyLossConfig):
        """verl's PolicyLossConfig with the options of the ``lambda_grpo`` policy loss (meanings and
        defaults of :class:`lambda_grpo.LossConfig`): ``trace`` (None, "recent", "both"),
        ``trace_decay``, ``trace_mode`` ("ratio", "weight"), ``adv_clamp_min``.

        Select it in the actor config with
        ``actor_rollout_ref.actor.policy_loss._target_=lambda_grpo.integrations.verl.LambdaGRPOPolicyLossConfig``,
        ``actor_rollout_ref.actor.policy_loss.loss_mode=lambda_grpo`` (or ``lambda_grpo_cispo``,
        ``lambda_grpo_sapo``, ``lambda_grpo_gspo``) and e.g. ``+actor_rollout_ref.actor.policy_loss.trace=recent``.
        ``loss_mode`` must be a loss that reads these fields (one of ``LOSS_NAMES``): any other is
        refused, so that a trace is never silently dropped.

        ``lambda_lr`` (λ's SGD rate, >= 0) and ``lambda_init`` (λ's start; 0 is dapo) are read only by
        :class:`LambdaTrainingWorker` (λ-GRPO, ``loss_mode="lambda_grpo"``); the registered policy
        losses alone have no λ and warn once when these are set off their defaults."""

        loss_mode: str = LOSS_NAME
        trace: Optional[str] = None
        trace_decay: float = _DEFAULTS.trace_decay
        trace_mode: str = _DEFAULTS.trace_mode
        adv_clamp_min: Optional[float] = None
        lambda_lr: float = LAMBDA_LR
        lambda_init: float = 0.0

        def __post_init__(self):
            if self.loss_mode not in LOSS_NAMES:
                raise _error(f"LambdaGRPOPolicyLossConfig.loss_mode: expected one of {sorted(LOSS_NAMES)} (the losses "
                             f"that read trace, trace_decay, trace_mode and adv_clamp_min), got {self.loss_mode!r}; "
                             f"set actor_rollout_ref.actor.policy_loss.loss_mode={LOSS_NAME}")
            for name in ("lambda_lr", "lambda_init"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or (
                        name == "lambda_lr" and v < 0):
                    raise _error(f"LambdaGRPOPolicyLossConfig.{name}: expected a finite number"
                                 f"{' >= 0' if name == 'lambda_lr' else ''}, got {v!r}")
            try:
                LossConfig(trace=self.trace, trace_decay=self.trace_decay, trace_mode=self.trace_mode,
                           adv_clamp_min=self.adv_clamp_min, **VERL_LOSSES[LOSS_NAMES[self.loss_mode]])
            except ValueError as e:
                raise _error(f"LambdaGRPOPolicyLossConfig: {e}") from e

    for _name in LOSS_NAMES:
        register(_name)
    __all__.append("LambdaGRPOPolicyLossConfig")


_WORKERS = ("LambdaTrainingWorker", "LambdaActorRolloutRefWorker")


def __getattr__(name):  # LambdaGRPOPolicyLossConfig without verl: say why; the workers on first use
    if name == "LambdaGRPOPolicyLossConfig":
        _require_verl(f"lambda_grpo.integrations.verl.{name}")
    if name in _WORKERS:
        _require_verl(f"lambda_grpo.integrations.verl.{name}")
        return _define_workers()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# Tier 2 pieces: groups from uid, lambda's state, the whole actor loss
# --------------------------------------------------------------------------------------------
def group_lengths_from_uid(uid: Sequence, response_mask: torch.Tensor):
    """Each row's group, for λ-GRPO where groups are split and shuffled before the loss.

    uid: (B,) the prompt id of each row (verl's ``non_tensor_batch["uid"]``: a numpy object array
    of strings; any sequence of hashables, or an integer tensor). response_mask: (B, T).
    Returns ``(group_lengths (B, G) int64, group_index (B,) int64)`` on the mask's device:
    row i's group holds G rows, ``group_lengths[i]`` are their numbers of valid tokens in row
    order, and ``group_index[i]`` is which of them row i is, so ``group_lengths[i,
    group_index[i]] == response_mask[i].sum()``. Every group must have the same size G
    (verl's ``rollout.n``): the λ-GRPO weights use G (docs/math.md §5).
    """
    if isinstance(uid, torch.Tensor):
        uid = uid.detach().cpu().numpy()
    keys = np.asarray(uid, dtype=object) if not isinstance(uid, np.ndarray) else uid
    if keys.ndim != 1:
        raise _error(f"uid: expected shape (B,), got shape {keys.shape}")
    if not isinstance(response_mask, torch.Tensor) or response_mask.dim() != 2 or response_mask.shape[0] != len(keys):
        raise _error(f"response_mask: expected a ({len(keys)}, T) tensor")
    B = len(keys)
    lengths = (response_mask != 0).sum(dim=1).cpu()
    if B == 0:
        z = torch.zeros((0, 0), dtype=torch.long)
        return z.to(response_mask.device), torch.zeros(0, dtype=torch.long, device=response_mask.device)
    first = {}
    inv = np.empty(B, dtype=np.int64)
    for i, k in enumerate(keys.tolist()):
        inv[i] = first.setdefault(k, len(first))
    counts = np.bincount(inv)
    if counts.min() != counts.max():
        raise _error(f"uid: every group must have the same number of rows (rollout.n); got sizes "
                     f"{sorted(set(counts.tolist()))}")
    G = int(counts[0])
    members = np.argsort(inv, kind="stable").reshape(len(counts), G)  # rows of group k, in row order
    index = np.empty(B, dtype=np.int64)
    index[members] = np.arange(G)[None, :]
    gl = lengths[torch.from_numpy(members)][torch.from_numpy(inv)]
    return gl.to(response_mask.device), torch.from_numpy(index).to(response_mask.device)


class LambdaState:
    """λ of λ-GRPO outside the engine's optimiser (verl optimises only the model's parameters).

    ``lam`` is a float64 0-d leaf tensor with ``requires_grad``, on the CPU: pass it as ``lam``
    to the loss, and every backward of the optimiser step (the micro-batches) adds its gradient
    to ``lam.grad``. After the engine's optimiser step, :meth:`step` averages that gradient over
    the data-parallel group (as the model's gradients are averaged), takes one SGD step of rate
    ``lr`` and clears the gradient. Every rank starts from the same value and applies the same
    averaged gradient, so λ stays identical on every rank. The step is skipped (the gradient
    still cleared) where the engine skipped its update (``skip``, on any rank) or the averaged
    gradient is not finite, as verl skips a model update with a non-finite gradient norm.
    """

    def __init__(self, init: float = 0.0, lr: float = LAMBDA_LR):
        for name, v in (("init", init), ("lr", lr)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise _error(f"LambdaState.{name}: expected a finite number{' >= 0' if name == 'lr' else ''}, "
                             f"got {v!r}")
        if lr < 0:  # as LambdaGRPOConfig.lambda_lr and TrainConfig.lambda_lr (issue 18, finding 5)
            raise _error(f"LambdaState.lr: expected a finite number >= 0, got {lr!r}")
        self.lam = torch.tensor(float(init), dtype=torch.float64, requires_grad=True)
        self.lr = float(lr)
        self.steps = 0
        self.last_grad: Optional[float] = None  # the averaged, unscaled gradient of the last step() call
        self.last_skipped = False

    @property
    def value(self) -> float:
        return float(self.lam.detach())

    def step(self, group=None, *, scale: float = 1.0, skip: bool = False) -> float:
        """All-reduce (mean over ``group``, torch.distributed's default group when None, nothing
        when torch.distributed is not initialised) the accumulated gradient, divide it by
        ``scale`` (the loss scale of an fp16 ``GradScaler``, which multiplied every backward),
        step unless ``skip`` is true on some rank or the result is not finite, clear the gradient.
        A collective: every rank of ``group`` must call it, also ranks whose backward never reached
        λ. Returns the averaged gradient (0 when no backward reached λ)."""
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0):
            raise _error(f"LambdaState.step: scale: expected a finite number > 0, got {scale!r}")
        g = torch.zeros((), dtype=torch.float64) if self.lam.grad is None else self.lam.grad.detach().clone()
        buf = torch.stack([g.reshape(()), torch.tensor(1.0 if skip else 0.0, dtype=torch.float64)])
        dist = torch.distributed
        world = 1
        if dist.is_available() and dist.is_initialized():
            backend = dist.get_backend(group)
            dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            buf = buf.to(dev)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
            buf, world = buf.cpu(), dist.get_world_size(group)
        g = buf[0] / world / scale
        skipped = bool(buf[1] > 0) or not bool(torch.isfinite(g))
        self.lam.grad = None
        if not skipped:
            with torch.no_grad():
                self.lam -= self.lr * g
            self.steps += 1
        self.last_grad, self.last_skipped = float(g), skipped
        return float(g)

    def state_dict(self) -> dict:
        return {"lam": self.value, "lr": self.lr, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` in place (``lam`` stays the same tensor)."""
        with torch.no_grad():
            self.lam.fill_(float(state["lam"]))
        self.lr = float(state.get("lr", self.lr))
        self.steps = int(state.get("steps", 0))
        self.lam.grad = None


def _actor_loss_config(config, length_r: float) -> LossConfig:
    """The LossConfig of :func:`lambda_grpo_actor_loss` under the actor config ``config``."""
    if _get(config, "loss_agg_mode", "token-mean") != "token-mean":
        raise _error(f"λ-GRPO normalises like dapo: actor.loss_agg_mode must be 'token-mean', got "
                     f"{_get(config, 'loss_agg_mode')!r}")
    beta = 0.0
    kl_estimator = "k3"
    if _get(config, "use_kl_loss", False):
        kl_type = _get(config, "kl_loss_type", "low_var_kl")
        if kl_type not in KL_ESTIMATORS:
            raise _error(f"kl_loss_type {kl_type!r} has no equivalent; expected one of {sorted(KL_ESTIMATORS)}")
        beta, kl_estimator = float(_get(config, "kl_loss_coef", 0.0)), KL_ESTIMATORS[kl_type]
    entropy_coef = float(_get(config, "entropy_coeff", 0.0) or 0.0)
    return loss_config_from_verl(config, "token-mean", aggregation="lambda_grpo", beta=beta,
                                 kl_estimator=kl_estimator, entropy_coef=entropy_coef).replace(length_r=float(length_r))


def lambda_grpo_actor_loss(config, model_output, data, dp_group=None, *, lam_state: LambdaState,
                           length_r: float = _DEFAULTS.length_r):
    """The whole verl actor loss of λ-GRPO, for ``set_loss_fn(partial(lambda_grpo_actor_loss,
    config=actor_config, lam_state=state))`` in place of verl's ``ppo_loss`` (same arguments).

    One ``grpo_loss_from_logprobs`` call computes the clipped surrogate, the KL (``use_kl_loss``,
    ``kl_loss_coef``, ``kl_loss_type`` kl/k1, mse/k2, low_var_kl/k3) and the entropy bonus
    (``entropy_coeff``), all weighted by the λ-GRPO row weights f_i and divided by
    ``batch_num_tokens / dp_size`` (so at λ = 0 it equals verl's ``ppo_loss`` with ``token-mean``,
    up to verl's ±10 clamp of low_var_kl). The batch must carry ``lg_group_lengths`` (B, G) and
    ``lg_group_index`` (B,) (:func:`group_lengths_from_uid`; :class:`LambdaTrainingWorker` writes
    them from ``uid``); λ's gradient accumulates in ``lam_state.lam.grad``, stepped by the worker
    after the optimiser step. :class:`LambdaTrainingWorker` installs this loss by itself.
    """
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding

    cfg = _actor_loss_config(config, length_r)

    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    entropy = model_output.get("entropy", None)
    if cfg.needs_entropy:
        if entropy is None:
            raise _error("entropy_coeff != 0 but the model output has no entropy")
        entropy = no_padding_2_padding(entropy, data)
    dp_size, n_tok = data["dp_size"], data["batch_num_tokens"]
    fields = ["response_mask", "old_log_probs", "advantages", GROUP_LENGTHS_KEY, GROUP_INDEX_KEY]
    for k in ("rollout_is_weights", "ref_log_prob"):
        if k in data.keys():
            fields.append(k)
    missing = [k for k in (GROUP_LENGTHS_KEY, GROUP_INDEX_KEY) if k not in data.keys()]
    if missing:
        raise _error(f"the batch has no {missing}: LambdaTrainingWorker.train_mini_batch writes them from the batch's "
                     "uid (group_lengths_from_uid)")
    d = data.select(*fields).to_padded_tensor()
    mask = d["response_mask"].to(torch.bool)
    gl, gi = d[GROUP_LENGTHS_KEY], d[GROUP_INDEX_KEY]
    out = grpo_loss_from_logprobs(
        log_prob, mask, d["advantages"], int(gl.shape[1]), old_logp=d["old_log_probs"],
        ref_logp=d.get("ref_log_prob", None) if cfg.beta > 0 else None, entropy=entropy if cfg.needs_entropy else None,
        lam=lam_state.lam, config=cfg, num_tokens=None if n_tok is None else n_tok / dp_size,
        group_lengths=gl, group_index=gi, token_weights=d.get("rollout_is_weights", None), return_per_token=True)
    metrics = Metric.from_dict(_pg_metrics(out, log_prob, d["old_log_probs"], d["advantages"], mask, cfg),
                               aggregation=AggregationType.MEAN)
    metrics["actor/pg_loss"] = Metric(value=out.loss.detach(), aggregation=AggregationType.SUM)
    metrics["actor/lambda"] = Metric(value=lam_state.value, aggregation=AggregationType.MEAN)
    return out.loss, metrics


# --------------------------------------------------------------------------------------------
# λ-GRPO in verl's actor update: the worker classes (defined on first use, see __getattr__)
# --------------------------------------------------------------------------------------------
_UNSET = object()


def _loss_fn_target(loss_fn, ppo_loss):
    """(actor config, length_r) of a loss function given to ``set_loss_fn``: verl's
    ``partial(ppo_loss, config=actor_config)`` (what ``ActorRolloutRefWorker.init_model`` passes) or
    ``partial(lambda_grpo_actor_loss, config=actor_config[, length_r=...][, lam_state=...])``."""
    if isinstance(loss_fn, functools.partial) and not loss_fn.args and "config" in loss_fn.keywords:
        kw = dict(loss_fn.keywords)
        if loss_fn.func is ppo_loss and set(kw) == {"config"}:
            return kw["config"], _DEFAULTS.length_r
        if loss_fn.func is lambda_grpo_actor_loss and set(kw) <= {"config", "lam_state", "length_r"}:
            return kw["config"], float(kw.get("length_r", _DEFAULTS.length_r))
    raise _error("LambdaTrainingWorker.set_loss_fn: loss_fn: expected functools.partial(verl.workers.utils.losses."
                 "ppo_loss, config=actor_config) (what ActorRolloutRefWorker.init_model passes) or functools.partial("
                 f"lambda_grpo_actor_loss, config=actor_config), got {loss_fn!r} (λ-GRPO has no distillation loss)")


_DEFINED: dict = {}


def _define_workers() -> dict:
    """Define LambdaTrainingWorker and LambdaActorRolloutRefWorker (once): they subclass verl's
    worker classes, whose module needs verl's whole worker stack (ray among it), which importing this
    module must not pull in (verl loads it as a plug-in in every process)."""
    if _DEFINED:
        return _DEFINED
    import torch.distributed as dist
    from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn
    from verl.single_controller.base.decorator import register as _register
    from verl.utils import tensordict_utils as tu
    from verl.utils.fs import copy_to_local, is_non_local
    from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker
    from verl.workers.utils.losses import ppo_loss

    def _dp(engine):
        group = engine.get_data_parallel_group()
        world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        return group, world

    class LambdaTrainingWorker(TrainingWorker):
        """verl's ``TrainingWorker`` (same constructor) that trains λ-GRPO, λ included.

        - :meth:`set_loss_fn` takes what verl gives its actor worker, ``partial(ppo_loss,
          config=actor_config)``, and installs :func:`lambda_grpo_actor_loss` with ``config``
          instead: ``actor.policy_loss.loss_mode`` must be ``"lambda_grpo"`` and
          ``actor.loss_agg_mode`` ``"token-mean"``; λ starts at ``policy_loss.lambda_init`` with SGD
          rate ``policy_loss.lambda_lr`` (:class:`LambdaGRPOPolicyLossConfig`; plain
          ``PolicyLossConfig``: 0 and 0.1). Once λ has been stepped or loaded, a later
          ``set_loss_fn`` keeps it.
        - :meth:`train_mini_batch` writes each row's group (``lg_group_lengths``,
          ``lg_group_index``) from the batch's ``uid``, over the whole data-parallel batch (one
          ``all_gather_object`` of the rows' uid and response lengths), before verl splits it into
          mini- and micro-batches; fields already in the batch are overwritten. A batch without
          ``uid`` must carry both fields.
        - :meth:`train_batch` (one optimiser step): after verl's step, dλ is averaged over the
          data-parallel group and λ takes one SGD step on every rank; the step is skipped where the
          engine skipped its update (non-finite gradient norm, seen on every rank through the
          engine's ``optimizer_step``); under fp16 dλ is divided by the loss scale the
          ``GradScaler`` used. The metrics get ``actor/lambda_grad`` (the averaged dλ); the loss
          logs ``actor/lambda`` (λ of the forward).
        - :meth:`save_checkpoint` / :meth:`load_checkpoint`: verl's, plus λ's state in
          ``lambda_grpo_world_size_{W}_rank_{r}.json`` next to verl's own per-rank shards, written and
          read by every rank (so it is wherever that rank's model shard is, shared file system or not);
          after a load, λ is checked to be the same on every data-parallel rank.

        ``worker.lambda_state`` is the :class:`LambdaState`. FSDP engines only (``fsdp``, ``fsdp2``).
        """

        def __init__(self, config):
            super().__init__(config)
            strategy = getattr(self.engine_config, "strategy", None)
            if strategy not in ("fsdp", "fsdp2"):
                raise _error(f"LambdaTrainingWorker: engine strategy: expected 'fsdp' or 'fsdp2' (the engines it is "
                             f"tested with), got {strategy!r}")
            self.lambda_state = LambdaState()
            self._lambda_touched = False  # stepped or loaded: set_loss_fn keeps λ from then on
            self._grad_norm = _UNSET
            engine_step = self.engine.optimizer_step

            def optimizer_step():  # the engine's own step; its gradient norm, on every rank
                self._grad_norm = engine_step()
                return self._grad_norm

            self.engine.optimizer_step = optimizer_step

        @_register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def set_loss_fn(self, loss_fn):
            config, length_r = _loss_fn_target(loss_fn, ppo_loss)
            pl = _get(config, "policy_loss")
            mode = _get(pl, "loss_mode", "vanilla")
            if mode != LOSS_NAME:
                raise _error(f"LambdaTrainingWorker trains λ-GRPO: actor.policy_loss.loss_mode: expected "
                             f"{LOSS_NAME!r}, got {mode!r}")
            _actor_loss_config(config, length_r)  # refuse a bad config now, not at the first step
            if not self._lambda_touched:
                fresh = LambdaState(init=_get(pl, "lambda_init", 0.0), lr=_get(pl, "lambda_lr", LAMBDA_LR))
                self.lambda_state.load_state_dict(fresh.state_dict())
            super().set_loss_fn(functools.partial(lambda_grpo_actor_loss, config=config, lam_state=self.lambda_state,
                                                  length_r=length_r))

        def _write_groups(self, data) -> None:
            uid = tu.get(data, "uid")
            keys = set(data.keys())
            if uid is None:
                if {GROUP_LENGTHS_KEY, GROUP_INDEX_KEY} <= keys:
                    return
                raise _error(f"LambdaTrainingWorker.train_mini_batch: the batch has no 'uid' (nor "
                             f"{GROUP_LENGTHS_KEY!r}, {GROUP_INDEX_KEY!r}): λ-GRPO needs each row's group")
            uid = uid.tolist() if isinstance(uid, (torch.Tensor, np.ndarray)) else list(uid)
            rm = data["response_mask"]
            rm = rm.to_padded_tensor(0) if rm.is_nested else rm
            lengths = (rm != 0).sum(dim=-1).cpu().tolist()
            if len(uid) != len(lengths):
                raise _error(f"uid: expected {len(lengths)} entries (one per row), got {len(uid)}")
            group, world = _dp(self.engine)
            parts = [(uid, lengths)]
            if world > 1:  # the whole data-parallel batch: groups are spread over the ranks
                parts = [None] * world
                dist.all_gather_object(parts, (uid, lengths), group=group)
            all_uid = [u for p in parts for u in p[0]]
            all_len = torch.tensor([n for p in parts for n in p[1]], dtype=torch.long)
            width = int(all_len.max()) if len(all_len) else 0
            gl, gi = group_lengths_from_uid(all_uid, torch.arange(width)[None] < all_len[:, None])
            off = sum(len(p[0]) for p in parts[:self.engine.get_data_parallel_rank()])
            data[GROUP_LENGTHS_KEY] = gl[off:off + len(uid)]
            data[GROUP_INDEX_KEY] = gi[off:off + len(uid)]

        @_register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="train"), blocking=False)
        def train_mini_batch(self, data):
            self._write_groups(data)
            return super().train_mini_batch(data)

        @_register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="train"), blocking=False)
        def train_batch(self, data):
            scaler = getattr(self.engine, "scaler", None)
            # the scale of this step's backward passes (the scaler's update() in optimizer_step may change it)
            scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
            self.lambda_state.lam.grad = None  # as the engine's zero_grad
            self._grad_norm = _UNSET
            output = super().train_batch(data)
            if self._grad_norm is _UNSET:
                raise RuntimeError("LambdaTrainingWorker: the engine's train_batch did not call optimizer_step, so λ "
                                   "cannot follow the model's update")
            gn = self._grad_norm
            skipped = gn is None or not math.isfinite(float(gn))
            group, _ = _dp(self.engine)
            g = self.lambda_state.step(group, scale=scale, skip=skipped)
            self._lambda_touched = True
            if output is not None:
                metrics = dict(tu.get(output, "metrics"))
                metrics["actor/lambda_grad"] = g
                tu.assign_non_tensor(output, metrics=metrics)
            return output

        def _lambda_path(self, local_path: str) -> str:
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            return os.path.join(local_path, LAMBDA_CKPT.format(world=world, rank=rank))

        @_register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
            out = super().save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep)
            if local_path is not None:
                path = self._lambda_path(local_path)
                tmp = f"{path}.tmp"
                with open(tmp, "w") as f:  # a float's repr round-trips exactly through JSON
                    json.dump(dict(self.lambda_state.state_dict(), global_step=int(global_step)), f)
                os.replace(tmp, path)
                if dist.is_available() and dist.is_initialized():
                    dist.barrier()  # as verl's own save: every rank's files are there when it returns
            return out

        @_register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
            state, local = None, None
            if local_path is not None:  # read first: verl may delete the local copies after its load
                path = self._lambda_path(local_path)
                local = copy_to_local(path) if is_non_local(path) else path
                if os.path.exists(local):
                    with open(local) as f:
                        state = json.load(f)
            out = super().load_checkpoint(local_path, hdfs_path, del_local_after_load)
            if local_path is None:
                return out
            if state is None:
                warnings.warn(f"LambdaTrainingWorker.load_checkpoint: no λ state ({os.path.basename(local)}) in "
                              f"{local_path}; λ keeps its value {self.lambda_state.value}", stacklevel=2)
            else:
                self.lambda_state.load_state_dict(state)
                self._lambda_touched = True
                if del_local_after_load and local != self._lambda_path(local_path):
                    os.remove(local)
            group, world = _dp(self.engine)
            if world > 1:  # every rank restored the same λ (a missing or stale file on one rank would not)
                v = torch.tensor([self.lambda_state.value, self.lambda_state.lr], dtype=torch.float64)
                hi, lo = v.clone(), -v
                dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
                dist.all_reduce(lo, op=dist.ReduceOp.MAX, group=group)
                if not torch.equal(hi, -lo):
                    raise _error(f"load_checkpoint({local_path!r}): λ or its lr differs across the data-parallel ranks "
                                 f"(λ in [{-lo[0].item()}, {hi[0].item()}], lr in [{-lo[1].item()}, {hi[1].item()}]): "
                                 "every rank needs its own lambda_grpo_world_size_*_rank_*.json")
            return out

    class LambdaActorRolloutRefWorker(ActorRolloutRefWorker):
        """verl's ``ActorRolloutRefWorker`` whose actor is a :class:`LambdaTrainingWorker`
        (``actor_worker_cls``): ``init_model`` builds it and hands it ``partial(ppo_loss,
        config=actor_config)``, which it turns into λ-GRPO; ``update_actor``, ``save_checkpoint`` and
        ``load_checkpoint`` reach it unchanged. The reference model stays verl's ``TrainingWorker``."""

        actor_worker_cls = LambdaTrainingWorker

    for cls in (LambdaTrainingWorker, LambdaActorRolloutRefWorker):
        cls.__qualname__ = cls.__name__  # pickled by reference, as module attributes
        globals()[cls.__name__] = cls
        _DEFINED[cls.__name__] = cls
    return _DEFINED
