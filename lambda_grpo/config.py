"""`LossConfig`: the frozen, validated description of one GRPO-family loss (docs/math.md §2-§5)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

AGGREGATIONS = ("grpo", "bnpo", "dapo", "dr_grpo", "lambda_grpo", "token_sum", "seq_mean_token_sum")
SURROGATES = ("clip", "cispo", "cispo_two_sided", "sapo", "vespo")
IMPORTANCE_SAMPLING = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
TRACE_STYLES = (None, "recent", "both")
TRACE_MODES = ("ratio", "weight")

# Fixed constants of the math (docs/math.md §2-§5). They are not config fields because the spec
# fixes them; they live here so that every backend reads the same numbers.
LOG_RATIO_CLAMP = 20.0  # rho = exp(clamp(z, -20, 20))
LENGTH_SIGMA_MIN = 1e-6  # sigma_g below this: z_i = 0 (all lengths equal)
LENGTH_H_MIN = 1e-6  # h_i = max(1 + r z_i, h_min)
# VESPO (TRL 1.16's get_gamma_weights): log w = clamp(sum_t clamp(x_t, +-20), ln 1e-8, 20), and
# its lambda is floored at 1e-4.
VESPO_LOG_W_MIN = math.log(1e-8)
VESPO_LAMBDA_MIN = 1e-4


def _fail(name: str, expected: str, actual) -> None:
    raise ValueError(f"LossConfig.{name}: expected {expected}, got {actual!r}")


@dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of the GRPO-family loss. Frozen and validated on construction.

    Fields (docs/math.md §2-§8, §13):
      aggregation: one of "grpo", "bnpo", "dapo", "dr_grpo", "lambda_grpo" (docs/math.md §5).
      eps_low, eps_high: PPO clip range [1 - eps_low, 1 + eps_high], both >= 0.
      dual_clip: c > 1 enables dual clipping for A < 0 (s = max(s, c*A)); None disables it.
      beta: KL coefficient (>= 0); beta > 0 needs ref_logp.
      kl_estimator: "k3" (default, exp(d) - d - 1), "k1" (-d) or "k2" (d^2/2), d = ref - logp.
      temperature: tau > 0, log-probs are taken of softmax(logits / tau).
      entropy_coef: weight of the entropy bonus (loss gets - entropy_coef * H).
      length_r: lambda-GRPO length transform h = max(1 + r z, h_min), h_min = 1e-6.
      trace: None, "recent" or "both" (GRPO-lambda eligibility-trace style).
      trace_decay: a = gamma * lambda_trace in (0, 1].
      trace_mode: "ratio" (trace the log-ratio) or "weight" (trace coefficients on the loss).
      adv_clamp_min: if set, A = max(A, adv_clamp_min) (GRPO-lambda uses -0.1).
      max_completion_length: L of dr_grpo; None means T (the padded length).
      compute_entropy: report entropy_mean even when entropy_coef == 0.
      surrogate: the policy term s(rho) (docs/math.md §2): "clip" (PPO, GRPO, DAPO; TRL's grpo,
        bnpo, dapo, dr_grpo, luspo; verl's vanilla), "cispo" (MiniMax-M1: -sg(min(rho, eps_high))
        A logp, eps_high an absolute cap as TRL's epsilon_high) or "sapo" (sigmoid(tau (rho - 1))
        4 / tau A, tau = sapo_tau_pos for A > 0 and sapo_tau_neg otherwise; TRL's sapo) or
        "cispo_two_sided" (verl's cispo: -sg(clip(rho, 1 - eps_low, 1 + eps_high)) A logp).
      delta: TRL's two-sided clip: the unclipped ratio is capped at delta (> 1 + eps_high);
        "clip" only. The same function as dual_clip = delta (see `dual_floor`): both names are
        accepted, as TRL and verl use them.
      kl_ratio_weighted: the KL term is multiplied by the ratio rho, with its gradient (TRL
        1.16's use_bias_correction_kl, its default; Liger 0.8.5).
      importance_sampling: "token" (rho_t of each token) or "sequence" (GSPO; TRL's
        importance_sampling_level="sequence"): every token of row i takes the ratio of the row's
        mean log-ratio, z_i = sum_t m x_t / max(1, n_i), with its gradient (1/n_i per token).
        Not with a ratio-mode trace (both would define z), nor with surrogate="vespo" (which
        builds its own sequence weight).
      surrogate "vespo" (TRL 1.16's vespo): s = phi A logp with phi = exp(l + k ln w - l w) a
        detached weight per row, w = exp(clamp(sum_t clamp(x_t, +-20), ln 1e-8, 20)) the row's
        sequence ratio, (k, l) = (vespo_k_pos, vespo_lambda_pos) where A >= 0, else the _neg
        pair, l floored at 1e-4 (TRL's defaults k 2/3, lambda 3/2).
    Aggregations beyond docs/math.md §4: "token_sum" (W = 1, verl's token-sum) and "seq_mean_token_sum"
    (W = 1 / N_seq, verl's seq-mean-token-sum; TRL's luspo with the clip surrogate).
    """

    aggregation: str = "lambda_grpo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: Optional[float] = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    temperature: float = 1.0
    entropy_coef: float = 0.0
    length_r: float = 1.0 / 9.0
    trace: Optional[str] = None
    trace_decay: float = 0.99
    trace_mode: str = "ratio"
    adv_clamp_min: Optional[float] = None
    max_completion_length: Optional[int] = None
    compute_entropy: bool = False
    surrogate: str = "clip"
    delta: Optional[float] = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    kl_ratio_weighted: bool = False
    importance_sampling: str = "token"
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            _fail("aggregation", f"one of {AGGREGATIONS}", self.aggregation)
        for name in ("eps_low", "eps_high", "beta", "temperature", "entropy_coef", "length_r", "trace_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                _fail(name, "a finite real number", v)
        if self.eps_low < 0:
            _fail("eps_low", ">= 0", self.eps_low)
        if self.eps_high < 0:
            _fail("eps_high", ">= 0", self.eps_high)
        if self.dual_clip is not None and not (isinstance(self.dual_clip, (int, float)) and self.dual_clip > 1):
            _fail("dual_clip", "None or a number > 1", self.dual_clip)
        if self.beta < 0:
            _fail("beta", ">= 0", self.beta)
        if self.kl_estimator not in KL_ESTIMATORS:
            _fail("kl_estimator", f"one of {KL_ESTIMATORS}", self.kl_estimator)
        if not self.temperature > 0:
            _fail("temperature", "> 0", self.temperature)
        if self.trace not in TRACE_STYLES:
            _fail("trace", f"one of {TRACE_STYLES}", self.trace)
        if not (0 < self.trace_decay <= 1):
            _fail("trace_decay", "0 < trace_decay <= 1", self.trace_decay)
        if self.trace_mode not in TRACE_MODES:
            _fail("trace_mode", f"one of {TRACE_MODES}", self.trace_mode)
        if self.adv_clamp_min is not None and not (
            isinstance(self.adv_clamp_min, (int, float)) and math.isfinite(self.adv_clamp_min)
        ):
            _fail("adv_clamp_min", "None or a finite number", self.adv_clamp_min)
        if self.surrogate not in SURROGATES:
            _fail("surrogate", f"one of {SURROGATES}", self.surrogate)
        for name in ("sapo_tau_pos", "sapo_tau_neg"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v > 0:
                _fail(name, "a finite number > 0", v)
        if self.delta is not None:
            number = not isinstance(self.delta, bool) and isinstance(self.delta, (int, float))
            if not number or not math.isfinite(self.delta) or not self.delta > 1 + self.eps_high:
                _fail("delta", f"None or a finite number > 1 + eps_high = {1 + self.eps_high}", self.delta)
            if self.surrogate != "clip":
                _fail("delta", "None unless surrogate='clip' (it caps the clip surrogate's unclipped ratio)",
                      self.delta)
        if self.dual_clip is not None and self.surrogate != "clip":
            _fail("dual_clip", "None unless surrogate='clip'", self.dual_clip)
        if self.surrogate == "cispo" and not self.eps_high > 0:
            _fail("eps_high", "> 0 with surrogate='cispo' (it is CISPO's cap on the ratio, e.g. 5.0)", self.eps_high)
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                _fail(name, "a finite real number", v)
        if self.importance_sampling not in IMPORTANCE_SAMPLING:
            _fail("importance_sampling", f"one of {IMPORTANCE_SAMPLING}", self.importance_sampling)
        if self.importance_sampling == "sequence" and self.ratio_trace:
            _fail("importance_sampling", "'token' with a ratio-mode trace (trace_mode='ratio' defines the ratio; "
                  "use trace_mode='weight' with 'sequence')", self.importance_sampling)
        if self.importance_sampling == "sequence" and self.surrogate == "vespo":
            _fail("importance_sampling", "'token' with surrogate='vespo' (VESPO builds its own sequence weight, "
                  "as TRL requires importance_sampling_level='token' for it)", self.importance_sampling)
        if self.surrogate == "vespo" and self.ratio_trace:
            _fail("trace_mode", "'weight' with surrogate='vespo' (its weight comes from the untraced sequence "
                  "ratio)", self.trace_mode)
        if not isinstance(self.kl_ratio_weighted, bool):
            _fail("kl_ratio_weighted", "a bool", self.kl_ratio_weighted)
        if not isinstance(self.compute_entropy, bool):
            _fail("compute_entropy", "a bool", self.compute_entropy)
        if self.max_completion_length is not None and not (
            isinstance(self.max_completion_length, int)
            and not isinstance(self.max_completion_length, bool)
            and self.max_completion_length > 0
        ):
            _fail("max_completion_length", "None or a positive int", self.max_completion_length)
        # A canonical string form, computed once: the torch.library ops take the config as a
        # string constant (torch.compile cannot run json.dumps while tracing).
        object.__setattr__(self, "_json", json.dumps(asdict(self), sort_keys=True))
        given = [v for v in (self.dual_clip, self.delta) if v is not None]
        object.__setattr__(self, "_dual_floor", min(given) if given else None)

    # --- derived flags (what the backends branch on) -------------------------------------
    @property
    def ratio_trace(self) -> bool:
        """The log-ratio is traced (GRPO-lambda epsilon-trace): z is a scan over the row."""
        return self.trace is not None and self.trace_mode == "ratio"

    @property
    def sequence_ratio(self) -> bool:
        """GSPO: every token of a row takes the ratio of the row's mean log-ratio."""
        return self.importance_sampling == "sequence"

    @property
    def row_coupled(self) -> bool:
        """A token's d(loss)/d(logp) needs the log-probs of other tokens of its row (a ratio-mode
        trace, the sequence ratio, VESPO's sequence weight): the loss then runs the two-pass
        schedule (the row pass between the vocabulary forward and the dlogits pass)."""
        return self.ratio_trace or self.sequence_ratio or self.surrogate == "vespo"

    @property
    def weight_trace(self) -> bool:
        """The per-token loss is scaled by trace coefficients c_t (GRPO-lambda epsilon-weight)."""
        return self.trace is not None and self.trace_mode == "weight"

    @property
    def dual_floor(self) -> Optional[float]:
        """The c of the fast backends' floor max(s, c A) where A < 0: the dual clip, and TRL's delta,
        which is the same rule (capping the unclipped ratio at delta > 1 + eps_high changes s only
        where A < 0 and rho > delta, to delta A: the dual clip at c = delta); both given, the smaller."""
        return self._dual_floor

    @property
    def uses_lambda(self) -> bool:
        """The loss has a learnable lambda (lambda-GRPO's length weighting)."""
        return self.aggregation == "lambda_grpo"

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_coef != 0 or self.compute_entropy

    def to_json(self) -> str:
        """Canonical JSON of the fields; LossConfig(**json.loads(s)) rebuilds the config."""
        return self._json

    def replace(self, **changes) -> "LossConfig":
        return replace(self, **changes)
