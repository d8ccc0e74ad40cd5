"""lambda_grpo inside TRL's GRPOTrainer (tested with trl 1.16; ``pip install "lambda-grpo[trl]"``).

    from lambda_grpo.integrations.trl import LambdaGRPOConfig, LambdaGRPOTrainer

    args = LambdaGRPOConfig(output_dir="out", loss_type="lambda_grpo", trace="both", beta=0.0)
    trainer = LambdaGRPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=my_reward, args=args,
                                train_dataset=dataset)
    trainer.train()

``LambdaGRPOConfig`` is TRL's ``GRPOConfig`` plus the fields of :class:`lambda_grpo.LossConfig` that
TRL has no name for (``trace``, ``trace_decay``, ``trace_mode``, ``adv_clamp_min``, ``dual_clip``,
``length_r``), λ's own optimiser (``lambda_lr``, ``lambda_init``) and where the loss gets its
inputs (``loss_route``, ``loss_backend``). ``loss_type`` takes TRL's ``grpo``, ``bnpo``, ``dapo``,
``dr_grpo``, ``cispo``, ``sapo``, ``luspo``, ``vespo`` (computed by lambda_grpo, equal to TRL's own
numbers, with TRL's ``importance_sampling_level``, ``delta``, ``use_bias_correction_kl``,
``sapo_temperature_pos/neg``, ``vespo_*``) and ``lambda_grpo``. One case is handed to TRL's own
loss unchanged: ``vespo`` with vLLM's importance-sampling correction (TRL folds that ratio into
VESPO's sequence weight, which lambda_grpo's VESPO does not take).

``LambdaGRPOTrainer`` overrides four private methods of TRL 1.16's GRPOTrainer (there is no public
loss hook in 1.16), which is why the extra pins ``trl>=1.16,<1.17``:

- ``_compute_loss``: the loss through lambda_grpo, with exactly TRL's normalisers
  (docs/integrations.md), TRL's metric names, plus ``lambda``;
- ``_generate_and_score_completions``: for λ-GRPO, each row's ``group_lengths`` (B, G) and
  ``group_index`` (B,) are added while the groups are still known (TRL then shuffles the rows and
  spreads a group over micro-batches and ranks; per-row tensors survive that);
- ``training_step``: λ's gradient, accumulated over the micro-batches, is averaged over the ranks
  and λ takes one SGD step per optimiser step;
- ``_save_checkpoint`` / ``_load_optimizer_and_scheduler``: λ and its optimiser state are written
  into every checkpoint directory (``lambda_grpo_state.pt``) and restored on resume.

Options whose numbers this adapter cannot reproduce are refused when the config or the trainer
is built, with the reason; nothing is silently ignored (see ``_refusals``).
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..api import grpo_loss, grpo_loss_from_logprobs
from ..config import TRACE_MODES, TRACE_STYLES, LossConfig
from .._rowmath import vespo_weight
from .._validate import BACKENDS

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import nanmax, nanmin
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError("lambda_grpo.integrations.trl needs TRL: pip install \"lambda-grpo[trl]\" "
                      "(trl>=1.16,<1.17)") from e

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

log = logging.getLogger(__name__)

TESTED_TRL = "1.16"
if not trl.__version__.startswith(TESTED_TRL + "."):
    warnings.warn(f"lambda_grpo.integrations.trl is tested with trl {TESTED_TRL}.x and overrides private methods "
                  f"of GRPOTrainer; trl {trl.__version__} is installed, so the numbers may differ. Run "
                  f"tests/test_integration_trl.py against it before trusting a run.", stacklevel=2)

OURS = ("grpo", "bnpo", "dapo", "dr_grpo", "cispo", "sapo", "luspo", "vespo", "lambda_grpo")
# TRL loss_type -> (LossConfig.aggregation, LossConfig.surrogate). The aggregation carries TRL's
# normaliser (docs/integrations.md, "Normalisers"): cispo divides like dapo, sapo like grpo, luspo
# is the clip surrogate summed per sequence and averaged over the micro-batch's rows.
LOSS_TYPES = {"grpo": ("grpo", "clip"), "bnpo": ("bnpo", "clip"), "dapo": ("dapo", "clip"),
              "dr_grpo": ("dr_grpo", "clip"), "cispo": ("dapo", "cispo"), "sapo": ("grpo", "sapo"),
              "luspo": ("seq_mean_token_sum", "clip"), "vespo": ("dapo", "vespo"),
              "lambda_grpo": ("lambda_grpo", "clip")}


def delegated(args) -> Optional[str]:
    """Why this config's loss goes to TRL's own ``_compute_loss`` unchanged, or None (lambda_grpo
    computes it): ``vespo`` with vLLM's importance-sampling correction, whose ratio TRL multiplies
    into VESPO's sequence ratio w (get_gamma_weights) instead of the surrogate."""
    if args.loss_type == "vespo" and args.use_vllm and args.vllm_importance_sampling_correction:
        return ("loss_type='vespo' with use_vllm and vllm_importance_sampling_correction: TRL folds the vLLM "
                "importance ratio into VESPO's sequence weight")
    return None
ROUTES = ("logprobs", "logits")
LAMBDA_STATE = "lambda_grpo_state.pt"
_DEFAULT_LAMBDA_LR = 0.1
_DEFAULTS = LossConfig()  # the adapter's defaults are LossConfig's, never retyped
_DEFAULT_LENGTH_R = _DEFAULTS.length_r
# Model inputs TRL forwards to _get_per_token_logps_and_entropies besides the ids (multimodal).
_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                 "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class LambdaGRPOConfig(GRPOConfig):
    r"""TRL's ``GRPOConfig`` with lambda_grpo's loss options.

    ``loss_type``: ``"grpo"``, ``"bnpo"``, ``"dapo"`` (TRL's default), ``"dr_grpo"``, ``"cispo"``,
    ``"sapo"``, ``"luspo"``, ``"vespo"`` or ``"lambda_grpo"`` are computed by lambda_grpo (``vespo``
    with vLLM's importance-sampling correction goes to TRL's own loss: :func:`delegated`). The
    fields below have :class:`lambda_grpo.LossConfig`'s meanings and defaults;
    clip range (CISPO's cap: ``epsilon_high``), β, ``use_bias_correction_kl``, ``delta``, SAPO's
    temperatures, temperature and ``max_completion_length`` come from TRL's own fields.
    """

    trace: Optional[str] = field(default=None, metadata={
        "help": "GRPO-λ eligibility traces: None, 'recent' or 'both' (LossConfig.trace)."})
    trace_decay: float = field(default=_DEFAULTS.trace_decay, metadata={
        "help": "Trace decay a = γ·λ_trace in (0, 1] (LossConfig.trace_decay)."})
    trace_mode: str = field(default=_DEFAULTS.trace_mode, metadata={
        "help": "'ratio' traces the log-ratio, 'weight' the per-token loss (LossConfig.trace_mode)."})
    adv_clamp_min: Optional[float] = field(default=None, metadata={
        "help": "If set, advantages are clamped from below at this value (GRPO-λ uses -0.1)."})
    dual_clip: Optional[float] = field(default=None, metadata={
        "help": "Dual clip c > 1 for negative advantages (LossConfig.dual_clip); clip surrogates only. TRL's "
                "`delta` is the same clip (set one of them)."})
    length_r: float = field(default=_DEFAULT_LENGTH_R, metadata={
        "help": "λ-GRPO length transform h = max(1 + r·z, 1e-6) (LossConfig.length_r)."})
    lambda_lr: float = field(default=_DEFAULT_LAMBDA_LR, metadata={
        "help": "Learning rate of λ's own SGD (loss_type='lambda_grpo'), stepped once per optimiser step."})
    lambda_init: float = field(default=0.0, metadata={
        "help": "Initial λ (loss_type='lambda_grpo'); 0 starts as DAPO exactly."})
    loss_route: str = field(default="logprobs", metadata={
        "help": "'logprobs': TRL's fused LM head gives per-token log-probs and entropies, lambda_grpo computes the "
                "loss from them (default). 'logits': the model's unfused forward gives (B, C, V) logits and "
                "lambda_grpo's fused logits kernel computes log-probs and loss (more memory; faster on CPU)."})
    loss_backend: str = field(default="auto", metadata={
        "help": "lambda_grpo backend of the logits route: 'auto', 'torch', 'triton' or 'reference'."})

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in OURS:
            raise ValueError(f"LambdaGRPOConfig.loss_type: expected one of {OURS}, got {self.loss_type!r}")
        if self.trace not in TRACE_STYLES:
            raise ValueError(f"LambdaGRPOConfig.trace: expected one of {TRACE_STYLES}, got {self.trace!r}")
        if self.trace_mode not in TRACE_MODES:
            raise ValueError(f"LambdaGRPOConfig.trace_mode: expected one of {TRACE_MODES}, got {self.trace_mode!r}")
        if self.loss_route not in ROUTES:
            raise ValueError(f"LambdaGRPOConfig.loss_route: expected one of {ROUTES}, got {self.loss_route!r}")
        if self.loss_backend not in BACKENDS:
            raise ValueError(f"LambdaGRPOConfig.loss_backend: expected one of {BACKENDS}, got {self.loss_backend!r}")
        if not _is_number(self.lambda_lr) or self.lambda_lr < 0:
            raise ValueError(f"LambdaGRPOConfig.lambda_lr: expected a finite number >= 0, got {self.lambda_lr!r}")
        if not _is_number(self.lambda_init):
            raise ValueError(f"LambdaGRPOConfig.lambda_init: expected a finite number, got {self.lambda_init!r}")
        problems = _refusals(self)
        if problems:
            raise ValueError("LambdaGRPOConfig: options lambda_grpo cannot honour:\n- " + "\n- ".join(problems))
        if delegated(self) is None:
            self.loss_config()  # LossConfig validates the remaining fields (trace_decay, dual_clip, ...)

    def loss_config(self) -> LossConfig:
        """The :class:`lambda_grpo.LossConfig` this config describes (for the loss types lambda_grpo computes):
        the aggregation and surrogate of ``LOSS_TYPES``, TRL's ``delta`` as ``LossConfig.delta`` (its
        literal two-sided clip), ``use_bias_correction_kl`` as ``kl_ratio_weighted``,
        ``sapo_temperature_pos/neg`` as ``sapo_tau_pos/neg``, and for cispo ``epsilon_high`` (which
        defaults to ``epsilon``, as in TRL) as the absolute cap on the ratio."""
        reason = delegated(self)
        if reason is not None:
            raise ValueError(f"loss_config: {reason}; that loss is computed by TRL, not lambda_grpo")
        eps_high = self.epsilon_high if self.epsilon_high is not None else self.epsilon
        aggregation, surrogate = LOSS_TYPES[self.loss_type]
        return LossConfig(
            aggregation=aggregation, surrogate=surrogate, eps_low=self.epsilon, eps_high=eps_high,
            dual_clip=self.dual_clip, delta=self.delta, kl_ratio_weighted=bool(self.use_bias_correction_kl),
            sapo_tau_pos=self.sapo_temperature_pos, sapo_tau_neg=self.sapo_temperature_neg,
            importance_sampling=self.importance_sampling_level, vespo_k_pos=self.vespo_k_pos,
            vespo_lambda_pos=self.vespo_lambda_pos, vespo_k_neg=self.vespo_k_neg,
            vespo_lambda_neg=self.vespo_lambda_neg,
            beta=self.beta, kl_estimator="k3", temperature=self.temperature, entropy_coef=0.0,
            length_r=self.length_r, trace=self.trace, trace_decay=self.trace_decay, trace_mode=self.trace_mode,
            adv_clamp_min=self.adv_clamp_min,
            max_completion_length=self.max_completion_length if self.loss_type == "dr_grpo" else None,
            # the logits route computes the entropies itself (TRL's `entropy` metric); the log-prob route gets
            # them from TRL's fused head
            compute_entropy=self.loss_route == "logits")


def _refusals(args) -> list:
    """What this adapter cannot reproduce, as readable sentences (empty: everything is honoured).

    TRL options that are honoured without a line here: the off-policy sequence mask, the high-entropy
    token mask (top_entropy_quantile) and vLLM's importance-sampling ratio all multiply TRL's
    surrogate term only, which is lambda_grpo's ``token_weights``; TRL's entropy bonus
    (``entropy_coef``) and MoE aux loss are added outside the aggregation exactly as TRL adds them;
    ``delta`` (two-sided clipping) is ``LossConfig.delta`` (for delta > 1 + epsilon_high);
    ``use_bias_correction_kl`` (KL x ratio, TRL's default) is ``LossConfig.kl_ratio_weighted``.
    """
    out = []
    reason = delegated(args)
    if reason is not None:
        changed = [n for n, default in (("trace", None), ("adv_clamp_min", None), ("dual_clip", None))
                   if getattr(args, n) != default]
        if changed:
            out.append(f"{reason}, so the loss is TRL's own, which has no {', '.join(changed)}: unset them")
        return out
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if args.loss_type == "vespo" and args.importance_sampling_level != "token":
        out.append(f"importance_sampling_level={args.importance_sampling_level!r} with loss_type='vespo': VESPO builds "
                   "its own sequence weight, and TRL asks for 'token' (it would use the sequence ratio only in the "
                   "KL x ratio and the metrics): set importance_sampling_level='token'")
    if args.use_adaptive_entropy:
        out.append("use_adaptive_entropy=True (TRL's adaptive entropy controller) is not reproduced: set it to False "
                   "(a fixed entropy_coef is supported)")
    if args.loss_type in ("cispo", "sapo", "vespo"):
        given = [n for n in ("delta", "dual_clip") if getattr(args, n) is not None]
        if given:
            out.append(f"{' and '.join(given)} with loss_type={args.loss_type!r}: both clip the clip surrogate's "
                       f"ratio, which {args.loss_type} does not have (TRL ignores delta there): unset "
                       f"{'them' if len(given) > 1 else 'it'}")
    elif args.delta is not None:
        if args.dual_clip is not None and args.dual_clip != args.delta:
            out.append(f"delta={args.delta} and dual_clip={args.dual_clip} are the same clip: set one of them")
        elif not args.delta > 1 + eps_high:
            out.append(f"delta={args.delta} <= 1 + epsilon_high = {1 + eps_high}: lambda_grpo's delta must exceed "
                       "1 + epsilon_high (TRL recommends delta > 1 + epsilon as well)")
    if args.loss_type == "dr_grpo" and args.max_completion_length is None:
        out.append("loss_type='dr_grpo' divides by max_completion_length: set it")
    if args.loss_route == "logits":
        if args.entropy_coef != 0:
            out.append("entropy_coef != 0 with loss_route='logits': TRL's entropy bonus needs the differentiable "
                       "entropies of TRL's fused head: use loss_route='logprobs'")
        if args.top_entropy_quantile < 1.0:
            out.append("top_entropy_quantile < 1 with loss_route='logits': the high-entropy mask needs the "
                       "entropies before the loss: use loss_route='logprobs'")
        if args.off_policy_mask_threshold is not None:
            out.append("off_policy_mask_threshold with loss_route='logits': the mask needs the log-probs before the "
                       "loss: use loss_route='logprobs'")
    return out


class LambdaGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with the loss computed by lambda_grpo (see the module docstring).

    Arguments as ``trl.GRPOTrainer``; ``args`` must be a :class:`LambdaGRPOConfig` (None builds a
    default one, as TRL does). Attributes added: ``loss_config`` (the LossConfig, None for a
    delegated loss type), ``lam`` (λ, a 0-d fp32 ``nn.Parameter`` on the training device, or None)
    and ``lambda_optimizer`` (its SGD).
    """

    def __init__(self, model, reward_funcs=None, args=None, *rest, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = LambdaGRPOConfig(f"{str(name).split('/')[-1]}-LambdaGRPO")
        elif not isinstance(args, LambdaGRPOConfig):
            raise TypeError(f"LambdaGRPOTrainer: args must be a LambdaGRPOConfig (it carries lambda_grpo's options "
                            f"and their checks), got {type(args).__name__}")
        self._lg_delegate = delegated(args) is not None
        if self._lg_delegate:
            unused = [n for n, d in (("lambda_lr", _DEFAULT_LAMBDA_LR), ("lambda_init", 0.0),
                                     ("length_r", _DEFAULT_LENGTH_R), ("loss_route", "logprobs"),
                                     ("loss_backend", "auto")) if getattr(args, n) != d]
            if unused:
                warnings.warn(f"LambdaGRPOTrainer: {delegated(args)}, so the loss is TRL's own; "
                              f"{', '.join(unused)} have no effect", stacklevel=2)
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        problems = []
        if not self._lg_delegate and args.loss_route == "logits":
            if self.aux_loss_enabled:
                problems.append("a MoE router aux loss with loss_route='logits': use loss_route='logprobs'")
            if self._is_vlm:
                problems.append("a vision-language model with loss_route='logits': use loss_route='logprobs'")
        if problems:
            raise ValueError("LambdaGRPOTrainer: options lambda_grpo cannot honour:\n- " + "\n- ".join(problems))
        self.loss_config = None if self._lg_delegate else args.loss_config()
        self.lam = None
        self.lambda_optimizer = None
        if self.loss_config is not None and self.loss_config.uses_lambda:
            dev = self.accelerator.device
            self.lam = torch.nn.Parameter(torch.tensor(float(args.lambda_init), dtype=torch.float32, device=dev))
            self.lambda_optimizer = torch.optim.SGD([self.lam], lr=args.lambda_lr)
            # dλ of the micro-batches of the current optimiser step, this rank (float64)
            self._lam_grad = torch.zeros((), dtype=torch.float64, device=dev)

    # ------------------------------------------------------------------------------------------------
    # groups: known here, shuffled and split afterwards
    # ------------------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.lam is not None:
            output.update(self._group_lengths(output))
        if not self._lg_delegate and self.model.training:
            self._warn_without_reward_variance()
        return output

    def _warn_without_reward_variance(self) -> None:
        """A logged warning when no group of the generation batch has reward variance: every
        advantage is then 0, so the loss, the policy gradient and dλ are exactly 0 and λ cannot
        move. Read from TRL's own `frac_reward_zero_std` of this batch (a global figure, no extra
        collective)."""
        frac = self._metrics["train"].get("frac_reward_zero_std") or [0.0]
        if frac[-1] >= 1.0:
            lam = "" if self.lam is None else f"; λ stays at {float(self.lam.detach()):.6g}"
            log.warning("LambdaGRPOTrainer: no reward variance in any group of this generation batch (global step "
                        "%d): every advantage is 0, so the loss and its gradient are 0%s. Rewards that differ "
                        "within a group are needed: a sampling temperature that varies the completions, a reward "
                        "with partial credit, or easier prompts.", self.state.global_step, lam)

    def _group_lengths(self, output) -> dict:
        """group_lengths (B, G) and group_index (B,) of the local rows of a generation batch.

        TRL's rows are G consecutive completions per prompt in the order of
        ``accelerator.gather`` (rank-major), the order it computes the group advantages in; this
        rank holds the slice [rank·B, (rank+1)·B). The loss-token counts of every rank are gathered
        once, so each row knows the lengths of all its siblings, wherever they are."""
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        n = mask.bool().sum(dim=1)
        B = n.shape[0]
        G = self.num_generations if self.model.training else self.num_generations_eval
        every = self.accelerator.gather(n)
        idx = self.accelerator.process_index * B + torch.arange(B, device=n.device)
        return {"group_lengths": every.view(-1, G)[idx // G], "group_index": idx % G}

    # ------------------------------------------------------------------------------------------------
    # the loss
    # ------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        if self._lg_delegate:
            return super()._compute_loss(model, inputs)
        cfg = self.loss_config
        mode = "train" if self.model.training else "eval"
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        C = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        maskf = mask.to(torch.float32)
        advantages = inputs["advantages"]
        adv2d = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        old_logp = inputs.get("old_per_token_logps")
        ref_logp = inputs["ref_per_token_logps"] if self.beta != 0.0 else None

        # Normalisers: exactly TRL's (docs/integrations.md, "Normalisers"). cispo is dapo's, sapo grpo's;
        # luspo: (ℓ·m).sum(-1).mean() / GA is seq_mean_token_sum with N_seq = B·GA.
        norm = {}
        if cfg.aggregation in ("dapo", "lambda_grpo"):
            n_tok = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                n_tok = n_tok * ga / self.args.steps_per_generation
            norm["num_tokens"] = n_tok
        elif cfg.aggregation in ("grpo", "dr_grpo", "seq_mean_token_sum"):
            norm["num_sequences"] = completion_ids.size(0) * ga
        group = {}
        if cfg.uses_lambda:
            group = {"group_lengths": inputs["group_lengths"], "group_index": inputs["group_index"]}
        gsize = group["group_lengths"].shape[1] if group else 1
        lam = None
        if cfg.uses_lambda:
            lam = self.lam.detach().clone().requires_grad_(torch.is_grad_enabled())

        entropies, aux_loss, entropy_mask = None, None, None
        if self.args.loss_route == "logprobs":
            logp, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, C, compute_entropy=True, compute_aux_loss=self.aux_loss_enabled,
                **{k: inputs.get(k) for k in _FORWARD_KEYS})
            if self.top_entropy_quantile < 1.0:
                entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
            weights = self._token_weights(inputs, logp, old_logp, adv2d, mask, entropy_mask)
            out = grpo_loss_from_logprobs(
                logp, mask.bool(), advantages, gsize, old_logp=old_logp, ref_logp=ref_logp, lam=lam, config=cfg,
                token_weights=weights, return_per_token=True, **norm, **group)
        else:
            with self.accelerator.autocast():
                logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=C + 1,
                               use_cache=False).logits[:, :-1]
            weights = self._token_weights(inputs, None, old_logp, adv2d, mask, None)
            out = grpo_loss(logits, completion_ids, mask.bool(), advantages, gsize, old_logp=old_logp,
                            ref_logp=ref_logp, lam=lam, config=cfg, backend=self.args.loss_backend,
                            return_per_token=True, token_weights=weights, **norm, **group)
            entropies = out.per_token["entropy"]

        loss = out.loss
        policy_loss = loss.detach()
        if cfg.aggregation == "bnpo":  # local by definition: TRL divides by the accumulation steps
            loss = loss / ga
        elif cfg.aggregation in ("grpo", "dr_grpo", "seq_mean_token_sum"):  # TRL logs it before its division by GA
            policy_loss = policy_loss * ga
        if lam is not None and lam.requires_grad and mode == "train":
            (dlam,) = torch.autograd.grad(out.loss, lam, retain_graph=True)
            self._lam_grad += dlam.to(torch.float64)

        if self._entropy_bonus_enabled:  # TRL's bonus: a token mean outside the aggregation, scaled for GA only
            eff = mask if entropy_mask is None else mask * entropy_mask
            entropy_loss = (entropies * eff).sum() / eff.sum().clamp(min=1.0) / ga
            loss = loss - self.entropy_coef * entropy_loss
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / ga
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._log_loss_metrics(mode, out, entropies.detach(), maskf, adv2d)
        return loss

    def _token_weights(self, inputs, logp, old_logp, adv2d, mask, entropy_mask):
        """TRL's multipliers of the surrogate term (never of the KL): the off-policy sequence mask,
        the high-entropy token mask and vLLM's importance-sampling ratio, as lambda_grpo's
        token_weights (B, C); None when there is none."""
        w = None
        if self.off_policy_mask_threshold is not None:
            old = logp.detach() if old_logp is None else old_logp
            sampling = inputs.get("sampling_per_token_logps", old)
            w = self.get_off_policy_mask(advantages=adv2d, per_token_logps=logp, sampling_per_token_logps=sampling,
                                         mask=mask, off_policy_threshold=self.off_policy_mask_threshold)
        if entropy_mask is not None:
            w = entropy_mask if w is None else w * entropy_mask
        if self.loss_config.surrogate == "vespo":
            # TRL folds any importance_sampling_ratio in the inputs into VESPO's weight (the config hands
            # that case, vLLM's correction, to TRL's own loss: see `delegated`)
            if "importance_sampling_ratio" in inputs or (self.use_vllm and self.vllm_importance_sampling_correction):
                raise ValueError("LambdaGRPOTrainer: an importance_sampling_ratio with loss_type='vespo' is TRL's own "
                                 "loss: build the trainer with use_vllm and vllm_importance_sampling_correction set "
                                 "in LambdaGRPOConfig")
        elif self.use_vllm and self.vllm_importance_sampling_correction:
            r = inputs["importance_sampling_ratio"]
            w = r if w is None else w * r
        if w is None:
            return None
        return w.to(torch.float32).expand(mask.shape).detach()

    def _log_loss_metrics(self, mode, out, entropies, maskf, adv2d):
        """TRL's metric names and values, gathered over ranks, plus lambda: kl (β ≠ 0; times the ratio
        with use_bias_correction_kl, as TRL logs it), entropy, and per surrogate what TRL logs for
        its loss type: clip_ratio/* for the clip surrogate, cispo_clip_ratio (A > 0 and ρ above the
        cap) for cispo, vespo/phi_seq_mean (VESPO's weight φ) for vespo, nothing more for sapo.

        As TRL: with the sequence-level ratio and per-sequence advantages the clip flags are one
        per row (every row counts, an empty one with ratio 1) and their means are over rows; so
        is VESPO's φ; everything else is a mean over the valid tokens."""
        pt = out.per_token
        cfg = self.loss_config
        adv = adv2d if cfg.adv_clamp_min is None else adv2d.clamp(min=cfg.adv_clamp_min)
        per_row = adv.shape[1] == 1 and (cfg.sequence_ratio or cfg.surrogate == "vespo")
        n = maskf.sum(-1, keepdim=True)
        flags = []  # 0/1 tensors whose (masked, or per-row) means are logged

        def flag(key):  # the loss's own clip flags (per token; per row: the row's, 0 for an empty row)
            f = pt[key].float()
            return f.amax(dim=-1, keepdim=True) if per_row else f

        if cfg.surrogate == "clip":
            low, high = flag("clip_low"), flag("clip_high")
            flags = [low, high, low + high]  # TRL's region: low or high (they never both hold)
        elif cfg.surrogate == "cispo":
            flags = [flag("clip_high")]  # A > 0 and the ratio above CISPO's cap
        elif cfg.surrogate == "vespo":  # the loss's own phi rule, from the (clamped) token log-ratios
            x = torch.where(maskf > 0, torch.log(pt["ratio"].clamp(min=1e-30)), torch.zeros_like(maskf))
            # every position counts (x is 0 off the mask): an empty row gets TRL's phi(w = 1), not 0
            phi = vespo_weight(x, torch.ones_like(maskf, dtype=torch.bool), adv.expand_as(x), cfg)
            phi = phi[:, :1] if adv.shape[1] == 1 else phi
            flags = [phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)]  # as TRL logs it
        if per_row:  # one value per row: sums over rows, counted by rows
            sums = [(x * maskf).sum() for x in [entropies]] + [x.sum() for x in flags]
            row_count = torch.tensor(float(adv.shape[0]), device=maskf.device)
        else:
            sums = [(x * maskf).sum() for x in [entropies] + [f.expand_as(maskf) for f in flags]]
            row_count = None
        if self.beta != 0.0:
            sums.append((pt["kl"] * maskf).sum())
        sums.append(maskf.sum())
        if row_count is not None:
            sums.append(row_count)
        totals = self.accelerator.reduce(torch.stack(sums).float(), reduction="sum")
        tokens = totals[-2 if row_count is not None else -1].clamp(min=1.0)
        rows = totals[-1].clamp(min=1.0) if row_count is not None else tokens
        means = [float(totals[0] / tokens)] + [float(t / rows) for t in totals[1:1 + len(flags)]]
        if self.beta != 0.0:
            means.append(float(totals[1 + len(flags)] / tokens))
        m = self._metrics[mode]
        if self.beta != 0.0:
            m["kl"].append(means[-1])
        m["entropy"].append(means[0])
        if cfg.surrogate == "clip":
            low, high = flags[0], flags[1]
            m["clip_ratio/low_mean"].append(means[1])
            m["clip_ratio/high_mean"].append(means[2])
            m["clip_ratio/region_mean"].append(means[3])
            if per_row:
                per_seq = torch.cat([low, high], dim=1)
            else:
                per_seq = torch.stack([(low * maskf).sum(-1), (high * maskf).sum(-1)], dim=1) / n
            per_seq = self.accelerator.gather(per_seq)
            m["clip_ratio/low_min"].append(nanmin(per_seq[:, 0]).item())
            m["clip_ratio/high_max"].append(nanmax(per_seq[:, 1]).item())
        elif cfg.surrogate == "cispo":
            m["cispo_clip_ratio"].append(means[1])
        elif cfg.surrogate == "vespo":
            m["vespo/phi_seq_mean"].append(means[1])
        if self.lam is not None:
            m["lambda"].append(float(self.lam.detach()))

    # ------------------------------------------------------------------------------------------------
    # λ: one SGD step per optimiser step, with the gradient averaged over ranks
    # ------------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.lam is not None and self.accelerator.sync_gradients:
            self._lambda_step()
        return loss

    def _lambda_step(self) -> None:
        grad = self._lam_grad
        if self.accelerator.num_processes > 1:
            grad = self.accelerator.reduce(grad.clone(), reduction="mean")
        self.lam.grad = grad.to(self.lam.dtype).reshape(self.lam.shape)
        self.lambda_optimizer.step()
        self.lambda_optimizer.zero_grad(set_to_none=True)
        self._lam_grad.zero_()

    # ------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.lam is not None and self.args.should_save:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), name)
            torch.save({"lambda": self.lam.detach().cpu(), "optimizer": self.lambda_optimizer.state_dict()},
                       os.path.join(folder, LAMBDA_STATE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.lam is None or checkpoint is None:
            return
        path = os.path.join(checkpoint, LAMBDA_STATE)
        if not os.path.exists(path):
            warnings.warn(f"LambdaGRPOTrainer: {path} does not exist (a checkpoint of another trainer?); λ starts "
                          f"at lambda_init = {self.args.lambda_init}", stacklevel=2)
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            self.lam.copy_(state["lambda"].to(self.lam.device))
        self.lambda_optimizer.load_state_dict(state["optimizer"])
