"""The loss implementations the suite puts side by side.

A provider turns a case's inputs into a `Runner`: `forward()` returns the 0-d loss, `backward(out)`
runs autograd, and `leaves` are the tensors whose gradients are compared and freed between calls.
`skip_reason(case, device)` says, in one printed sentence, why a provider cannot run somewhere.

All providers of the "logits" task compute the docs/math.md §2-§5 loss of the case's mode from the very
same (B, T, V) logits; those of the "hidden" task start from hidden states and the LM-head weight
and therefore include the LM-head matmul (forward and both backward matmuls).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import lambda_grpo as lg

from .trl_formula import trl_policy_loss
from lambda_grpo._validate import validate
from lambda_grpo.reference import reference_loss

from .cases import Case, lam_leaf

# Multiples of one (N, V) tensor in the logits' dtype that a provider is expected to hold at its
# peak (fwd+bwd). Used only to skip a provider *before* running it when the expected peak would
# not fit in the memory budget of a shared machine; never reported as a measurement. The values
# are the measured multiples of development runs (eager fp64 ~6x: an fp64 copy, the log-softmax
# output and its gradient, each twice the fp32 size), rounded up.
EXPECTED_PEAK_MULTIPLE = {
    "reference": 6.5, "eager_fp32": 4.5, "compile_fp32": 2.5, "trl": 4.5, "torch": 1.2, "triton": 1.2,
    "torch_inplace": 1.2,  # 0.2 for the step, plus the private copy of the logits it restores from
    "liger_triton": 0.5, "liger_chunked": 0.2, "torch_linear": 2.5, "floor": 2.0,
    # hidden task (multiples of one (N, V) fp32 tensor; dW (V, H) is counted in them at these shapes)
    "fused_linear": 0.6, "trl_head": 1.5, "verl_head": 1.2,
}


@dataclass
class Runner:
    forward: Callable[[], torch.Tensor]
    leaves: Dict[str, torch.Tensor]
    backward: Optional[Callable[[torch.Tensor], None]] = None
    notes: List[str] = field(default_factory=list)
    # Called by zero_grad, i.e. before every call and outside the timed region: restores inputs a
    # call destroys (inplace_backward writes the gradient over the logits).
    reset: Optional[Callable[[], None]] = None

    def run_backward(self, out: torch.Tensor) -> None:
        if self.backward is not None:
            self.backward(out)
        else:
            out.backward()

    def zero_grad(self) -> None:
        for t in self.leaves.values():
            t.grad = None
        if self.reset is not None:
            self.reset()


@dataclass(frozen=True)
class Provider:
    name: str
    label: str
    task: str
    make: Callable[[Case, dict, str], Runner]
    skip: Callable[[Case, str], Optional[str]]
    is_loss: bool = True  # False for context rows (the bare LM-head matmul): not agreement-checked
    # True when the provider does its softmax arithmetic in the logits' dtype (TRL's bf16 path runs
    # log_softmax in bf16); it is then held to the looser "math in bf16" tolerance for bf16 inputs.
    low_precision_math: bool = False


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _logits_leaf(inputs: dict, device: str) -> torch.Tensor:
    # The leaf shares the input's storage: no extra (N, V) copy sits in the baseline.
    return inputs["logits"].to(device).requires_grad_(True)


def _common(inputs: dict, device: str) -> dict:
    def mv(x):
        return None if x is None else x.to(device)

    return dict(tokens=mv(inputs["tokens"]), mask=mv(inputs["mask"]), advantages=mv(inputs["advantages"]),
                old_logp=mv(inputs["old_logp"]), ref_logp=mv(inputs["ref_logp"]), group_size=inputs["group_size"])


# --- our package -------------------------------------------------------------------------------

def _make_backend(backend: str):
    def make(case: Case, inputs: dict, device: str) -> Runner:
        logits = _logits_leaf(inputs, device)
        lam = lam_leaf(inputs)
        kw = _common(inputs, device)
        cfg = case.config()
        leaves = {"logits": logits, **({"lam": lam} if lam is not None else {})}
        return Runner(lambda: lg.grpo_loss(logits, lam=lam, config=cfg, backend=backend, **kw).loss, leaves)

    return make


def _make_backend_inplace(backend: str):
    """Ours with inplace_backward=True: the gradient is written over the logits, so the leaf is a
    private copy of the case's logits, restored from them before every call (outside the timed
    region; the restored pages are already mapped, as a model's fresh logits would be)."""
    def make(case: Case, inputs: dict, device: str) -> Runner:
        src = inputs["logits"].to(device)
        logits = src.clone().requires_grad_(True)
        lam = lam_leaf(inputs)
        kw = _common(inputs, device)
        cfg = case.config()
        leaves = {"logits": logits, **({"lam": lam} if lam is not None else {})}

        def reset():
            with torch.no_grad():
                logits.copy_(src)

        return Runner(lambda: lg.grpo_loss(logits, lam=lam, config=cfg, backend=backend, inplace_backward=True,
                                           **kw).loss, leaves, reset=reset,
                      notes=["inplace_backward=True: dlogits written over the logits (restored before each call, "
                             "untimed)"])

    return make


def _skip_torch_backend(case: Case, device: str) -> Optional[str]:
    return None


def _skip_triton_backend(case: Case, device: str) -> Optional[str]:
    if device != "cuda":
        return ("backend='triton' launches Triton kernels, which need CUDA; on CPU they run only under "
                "TRITON_INTERPRET=1 (a correctness tool, ~0.6 ms per program), so there is nothing to time here")
    return None


# --- plain torch: the reference, the same in fp32, and torch.compile of that ------------------------

def _eager(dtype, compiled: bool):
    def make(case: Case, inputs: dict, device: str) -> Runner:
        logits = _logits_leaf(inputs, device)
        lam = lam_leaf(inputs)
        kw = _common(inputs, device)
        cfg = case.config()

        def loss_fn(logits, lam):
            batch = validate(logits, kw["tokens"], kw["mask"], kw["advantages"], kw["group_size"], kw["old_logp"],
                             kw["ref_logp"], lam, cfg, None, None)
            return reference_loss(batch, cfg, dtype=dtype).loss

        fn = torch.compile(loss_fn, dynamic=False) if compiled else loss_fn
        leaves = {"logits": logits, **({"lam": lam} if lam is not None else {})}
        return Runner(lambda: fn(logits, lam), leaves)

    return make


def _skip_compile(case: Case, device: str) -> Optional[str]:
    if device == "cpu" and not any(shutil.which(c) for c in ("cc", "gcc", "g++", "clang")):
        return "torch.compile (inductor) needs a C++ compiler on CPU and none is on PATH"
    if case.mode == "lambda_trace":
        # The reference's traces loop over rows with data-dependent lengths (nonzero): dynamo breaks
        # the graph on every row, so what gets timed is mostly eager code plus guard overhead.
        return ("the reference's GRPO-lambda trace is a per-row Python loop with data-dependent lengths; "
                "torch.compile breaks the graph there (measured slower than eager in development), not timed")
    return None


# --- TRL 1.16: selective_log_softmax + GRPOTrainer's per-token loss and aggregation ----------------

TRL_MODES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _skip_trl(case: Case, device: str) -> Optional[str]:
    if not _has_module("trl"):
        return "trl is not installed (pip install trl==1.16.0)"
    agg = case.config().aggregation
    if agg not in TRL_MODES or case.config().trace is not None:
        return "TRL 1.16 has no lambda-GRPO length weighting or GRPO-lambda traces"
    return None


def trl_style_loss(logits, tokens, mask, advantages, old_logp, ref_logp, cfg: lg.LossConfig,
                   selective_log_softmax=None):
    """GRPO-family loss written the way TRL 1.16's GRPOTrainer computes it (token-level IS,
    bench/trl_formula.py) on per-token log-probs from TRL's own `selective_log_softmax`.

    logits (B, T, V) aligned with tokens (B, T); advantages (B,); old/ref (B, T). On CPU TRL's
    `selective_log_softmax` is gather minus a row-by-row logsumexp for fp32, a row-by-row
    log_softmax in the logits' dtype for bf16; on CUDA its Triton kernel. It may be passed in as
    `selective_log_softmax(logits, tokens, temperature=...)` (bench/gpu_check.py passes TRL's kernel
    where trl.trainer.utils cannot be imported). One process, no gradient accumulation: TRL's dapo
    normaliser `num_items_in_batch` is then the batch's token count.
    """
    if selective_log_softmax is None:
        from trl.trainer.utils import selective_log_softmax

    logp = selective_log_softmax(logits, tokens, temperature=cfg.temperature)
    loss_type = {"seq_mean_token_sum": "luspo"}.get(cfg.aggregation, cfg.aggregation)
    return trl_policy_loss(logp, mask, advantages, old_logp, ref_logp, loss_type=loss_type, beta=cfg.beta,
                           eps_low=cfg.eps_low, eps_high=cfg.eps_high, delta=cfg.delta,
                           use_bias_correction_kl=cfg.kl_ratio_weighted,
                           max_completion_length=cfg.max_completion_length or mask.shape[1])


def _make_trl(case: Case, inputs: dict, device: str) -> Runner:
    logits = _logits_leaf(inputs, device)
    kw = _common(inputs, device)
    cfg = case.config()
    return Runner(lambda: trl_style_loss(logits, kw["tokens"], kw["mask"], kw["advantages"], kw["old_logp"],
                                         kw["ref_logp"], cfg), {"logits": logits})


# --- Liger-Kernel 0.8.5 -------------------------------------------------------------------------

LIGER_MODES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _skip_liger_common(case: Case) -> Optional[str]:
    if not _has_module("liger_kernel"):
        return "liger-kernel is not installed (pip install --no-deps liger-kernel==0.8.5)"
    cfg = case.config()
    if cfg.aggregation not in LIGER_MODES or cfg.trace is not None:
        return "Liger-Kernel 0.8.5 has no lambda-GRPO length weighting or GRPO-lambda traces"
    return None


def _skip_liger_triton(case: Case, device: str) -> Optional[str]:
    if device != "cuda":
        return "Liger's triton_grpo_loss launches Triton kernels: CUDA only"
    return _skip_liger_common(case)


def _make_liger_triton(case: Case, inputs: dict, device: str) -> Runner:
    """Liger's fused Triton GRPO loss (CUDA). It takes unshifted logits (B, T+1, V) and drops the
    last position itself, so the aligned logits are placed in a (B, T+1, V) buffer once, up front."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    src = inputs["logits"]
    B, T, V = src.shape
    buf = torch.empty((B, T + 1, V), dtype=src.dtype, device=device)
    buf[:, :T] = src.to(device)
    buf[:, T] = 0
    kw = _common(inputs, device)
    cfg = case.config()
    leaf = buf.requires_grad_(True)

    def fwd():
        loss, _ = triton_grpo_loss(leaf, kw["old_logp"], kw["ref_logp"], kw["tokens"], kw["advantages"],
                                   completion_mask=kw["mask"].to(torch.int32).contiguous(),
                                   temperature=cfg.temperature, beta=cfg.beta, eps_low=cfg.eps_low,
                                   eps_high=cfg.eps_high, inplace=False, loss_type=cfg.aggregation, reduce=True)
        return loss

    # inplace=False: the suite reuses the logits across repeats, and dlogits must not alias them.
    return Runner(fwd, {"logits": leaf}, notes=["gradient compared on [:, :T] of the (B, T+1, V) buffer"])


def _skip_liger_chunked_logits(case: Case, device: str) -> Optional[str]:
    return ("LigerFusedLinearGRPOLoss takes hidden states and the LM-head weight, not logits: it is timed "
            "in the 'hidden' task, next to our backend preceded by the same matmul")


def _skip_liger_chunked(case: Case, device: str) -> Optional[str]:
    return _skip_liger_common(case)


def _linear_leaves(inputs: dict, device: str) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """The hidden task's leaves (hidden states, LM-head weight, and lambda when the case has one)
    and lambda (or None)."""
    leaves = {"hidden": inputs["hidden"].to(device).requires_grad_(True),
              "weight": inputs["weight"].to(device).requires_grad_(True)}
    lam = lam_leaf(inputs)
    if lam is not None:
        leaves["lam"] = lam
    return leaves, lam


def _make_liger_chunked(case: Case, inputs: dict, device: str) -> Runner:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    cfg = case.config()
    leaves, _ = _linear_leaves(inputs, device)  # no lambda: Liger has no lambda-GRPO (skipped)
    kw = _common(inputs, device)
    loss_mod = LigerFusedLinearGRPOLoss(beta=cfg.beta, use_ref_model=cfg.beta > 0, epsilon_low=cfg.eps_low,
                                        epsilon_high=cfg.eps_high, loss_type=cfg.aggregation,
                                        max_completion_length=case.T, temperature=cfg.temperature)
    mask = kw["mask"].to(torch.int64)

    def fwd():
        loss, _ = loss_mod(leaves["hidden"], leaves["weight"], kw["tokens"], mask, kw["advantages"],
                           ref_per_token_logps=kw["ref_logp"], old_per_token_logps=kw["old_logp"])
        return loss

    return Runner(fwd, leaves, notes=["Liger computes the gradients inside its forward (chunk by chunk); "
                                      "its 'forward' time is the whole fwd+bwd work"])


def _make_torch_linear(case: Case, inputs: dict, device: str) -> Runner:
    cfg = case.config()
    leaves, lam = _linear_leaves(inputs, device)
    kw = _common(inputs, device)

    def fwd():
        logits = F.linear(leaves["hidden"], leaves["weight"])
        return lg.grpo_loss(logits, lam=lam, config=cfg, backend="torch", **kw).loss

    return Runner(fwd, leaves)


def _make_fused_linear(case: Case, inputs: dict, device: str) -> Runner:
    """Ours from hidden states: lg.fused_linear_grpo_loss (chunks of valid tokens; the logits of
    one chunk at a time; dhidden and dW computed in the forward)."""
    cfg = case.config()
    leaves, lam = _linear_leaves(inputs, device)
    kw = _common(inputs, device)

    def fwd():
        return lg.fused_linear_grpo_loss(leaves["hidden"], leaves["weight"], lam=lam, config=cfg, backend="torch",
                                         **kw).loss

    return Runner(fwd, leaves)


# TRL 1.16's fused LM head: trl/kernels/chunked_logprob.py, called as add_fused_lm_head's forward
# calls it (trl/trainer/utils.py:1644); on CPU (no Triton device) it scores every position.
TRL_HEAD_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in 1.16.0


def _skip_trl_head(case: Case, device: str) -> Optional[str]:
    if not _has_module("trl"):
        return "trl is not installed (pip install trl==1.16.0)"
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"trl.kernels.chunked_logprob does not import: {type(e).__name__}: {e}"
    return None


def _make_trl_head(case: Case, inputs: dict, device: str) -> Runner:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton

    cfg = case.config()
    leaves, lam = _linear_leaves(inputs, device)
    kw = _common(inputs, device)
    mask = kw["mask"]
    compact = _use_triton(leaves["hidden"].device)

    def fwd():
        h = leaves["hidden"]
        B, T, H = h.shape
        # as add_fused_lm_head: only the valid positions on a Triton device, every position elsewhere
        hs = h[mask] if compact else h.reshape(-1, H)
        toks = kw["tokens"][mask] if compact else kw["tokens"].reshape(-1)
        lp, ent, *_ = ChunkedLogProbFunction.apply(hs, leaves["weight"], None, toks, cfg.temperature, TRL_HEAD_CHUNK,
                                                   None, 1.0, ("log_probs", "entropy"))
        if compact:
            lp = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
            ent = ent.new_zeros(mask.shape).masked_scatter(mask, ent)
        else:
            lp = lp.view(B, T).masked_fill(~mask, 0)
            ent = ent.view(B, T).masked_fill(~mask, 0)
        return lg.grpo_loss_from_logprobs(lp, mask, kw["advantages"], kw["group_size"], old_logp=kw["old_logp"],
                                          ref_logp=kw["ref_logp"], entropy=ent if cfg.needs_entropy else None,
                                          lam=lam, config=cfg).loss

    return Runner(fwd, leaves, notes=[
        f"TRL's ChunkedLogProbFunction (tiles of 4096 tokens x {TRL_HEAD_CHUNK} vocabulary columns, outputs "
        "log_probs and entropy as GRPOTrainer asks), then grpo_loss_from_logprobs; "
        + ("valid positions only (Triton device)" if compact else
           "CPU fallback: torch ops per tile, every position scored (as add_fused_lm_head does off Triton devices)")
        + "; the backward recomputes each tile's logits (4 matmuls)"])


# verl 0.9.1's torch FusedLinearForPPO (verl/utils/experimental/torch_functional.py). That module
# imports only torch (and, optionally, liger_kernel and flash_attn); importing it through the verl
# package runs verl/__init__.py, which imports ray. It is loaded from its file instead.
_VERL_MOD = None


def _load_verl_functional():
    global _VERL_MOD
    if _VERL_MOD is None:
        spec = importlib.util.find_spec("verl")  # locates the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("verl is not installed (pip install --no-deps verl==0.9.1)")
        path = os.path.join(list(spec.submodule_search_locations)[0], "utils", "experimental", "torch_functional.py")
        mspec = importlib.util.spec_from_file_location("_bench_verl_torch_functional", path)
        if mspec is None or not os.path.exists(path):
            raise ImportError(f"{path} not found (verl version without FusedLinearForPPO)")
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
        _VERL_MOD = mod
    return _VERL_MOD


def _skip_verl(case: Case, device: str) -> Optional[str]:
    try:
        mod = _load_verl_functional()
        mod.FusedLinearForPPO  # noqa: B018
    except Exception as e:  # noqa: BLE001
        return f"verl's FusedLinearForPPO does not import here: {type(e).__name__}: {e}"
    return None


def _make_verl(case: Case, inputs: dict, device: str) -> Runner:
    mod = _load_verl_functional()
    head = mod.FusedLinearForPPO(impl_backend="torch")  # chunk_size=512, verl's default
    cfg = case.config()
    leaves, lam = _linear_leaves(inputs, device)
    kw = _common(inputs, device)

    def fwd():
        lp, ent = head(leaves["hidden"], leaves["weight"], kw["tokens"], temperature=cfg.temperature)
        return lg.grpo_loss_from_logprobs(lp, kw["mask"], kw["advantages"], kw["group_size"],
                                          old_logp=kw["old_logp"], ref_logp=kw["ref_logp"],
                                          entropy=ent if cfg.needs_entropy else None, lam=lam, config=cfg).loss

    return Runner(fwd, leaves, notes=[
        f"verl 0.9.1 FusedLinearForPPO(impl_backend='torch', chunk_size={head.chunk_size}) loaded from "
        "verl/utils/experimental/torch_functional.py, then grpo_loss_from_logprobs; chunks of 512 tokens, full "
        "softmax per chunk, the backward recomputes each chunk's logits (4 matmuls); every position scored"])


def _never(case: Case, device: str) -> Optional[str]:
    return None


PROVIDERS: List[Provider] = [
    Provider("reference", "eager reference (fp64 math, autograd)", "logits", _make_backend("reference"), _never),
    Provider("eager_fp32", "eager plain torch, fp32 (autograd)", "logits", _eager(torch.float32, False), _never),
    Provider("compile_fp32", "torch.compile of the eager fp32 loss", "logits", _eager(torch.float32, True),
             _skip_compile),
    Provider("trl", "TRL 1.16 style (selective_log_softmax + GRPOTrainer loss)", "logits", _make_trl, _skip_trl,
             low_precision_math=True),
    Provider("torch", "ours: backend='torch'", "logits", _make_backend("torch"), _skip_torch_backend),
    Provider("torch_inplace", "ours: backend='torch', inplace_backward=True", "logits",
             _make_backend_inplace("torch"), _skip_torch_backend),
    Provider("triton", "ours: backend='triton'", "logits", _make_backend("triton"), _skip_triton_backend),
    Provider("liger_triton", "Liger 0.8.5 triton_grpo_loss", "logits", _make_liger_triton, _skip_liger_triton),
    Provider("liger_chunked", "Liger 0.8.5 LigerFusedLinearGRPOLoss", "logits", None, _skip_liger_chunked_logits),
    Provider("liger_chunked", "Liger 0.8.5 LigerFusedLinearGRPOLoss (incl. LM-head matmul)", "hidden",
             _make_liger_chunked, _skip_liger_chunked),
    Provider("fused_linear", "ours: fused_linear_grpo_loss (backend='torch')", "hidden", _make_fused_linear,
             _skip_torch_backend),
    Provider("torch_linear", "materialised logits: F.linear + our grpo_loss (backend='torch')", "hidden",
             _make_torch_linear, _skip_torch_backend),
    Provider("trl_head", "TRL 1.16 fused head (ChunkedLogProbFunction) + our grpo_loss_from_logprobs", "hidden",
             _make_trl_head, _skip_trl_head),
    Provider("verl_head", "verl 0.9.1 FusedLinearForPPO (torch) + our grpo_loss_from_logprobs", "hidden",
             _make_verl, _skip_verl),
]


def providers_for(task: str, names: Optional[List[str]] = None) -> List[Provider]:
    out = [p for p in PROVIDERS if p.task == task]
    if names:
        out = [p for p in out if p.name in names]
    return out


def split_threads(name: str):
    """"torch@1t" -> ("torch", 1): a provider run with that many intra-op threads; "torch" -> ("torch", None)."""
    if "@" in name:
        base, t = name.split("@", 1)
        return base, int(t.rstrip("t"))
    return name, None


def get(name: str, task: str) -> Provider:
    base, threads = split_threads(name)
    for p in PROVIDERS:
        if p.name == base and p.task == task:
            if threads is None:
                return p
            return Provider(name, f"{p.label} [{threads} intra-op thread{'s' if threads > 1 else ''}]", p.task,
                            p.make, p.skip, p.is_loss, p.low_precision_math)
    raise KeyError(f"provider {name!r} for task {task!r}")


def fault_factor(name: str) -> float:
    """Test hook: BENCH_FAULT=<provider> makes that provider's loss 1% too large, so the test suite
    can show that a disagreeing provider makes the run fail."""
    return 1.01 if os.environ.get("BENCH_FAULT") == name else 1.0
