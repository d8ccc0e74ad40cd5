"""lambda_grpo.integrations.trl against TRL 1.16's own GRPOTrainer (issue 11).

- Training parity, 1 process and 2 processes (torchrun, gloo): LambdaGRPOTrainer reproduces
  TRL's loss and grad_norm for grpo, bnpo, dapo and dr_grpo over 3 steps to >= 6 significant
  digits relative to max(|loss|, 0.1), with μ = 2, β = 0.04, use_bias_correction_kl=False, lengths
  1-12 (tests/_trl_tiny.py's eos trick) and clipping active (about half of the tokens at step 2);
  and for the loss types and options beyond the clip surrogate (tests/_trl_tiny.py's VARIANTS:
  cispo, sapo, luspo with delta, grpo with delta, all with TRL's default use_bias_correction_kl=True).
- λ-GRPO and GRPO-λ (trace="both") in 2 processes: every row carries its group's lengths, λ is
  identical on both ranks, saved into each checkpoint and restored on resume; at λ = 0 the first
  step equals TRL's dapo.
- One `_compute_loss` call of each trainer on the same inputs with TRL's extra terms switched on
  (entropy bonus, high-entropy mask, off-policy mask, vLLM importance ratio, delta, tool mask,
  KL x ratio) for every loss type lambda_grpo computes: equal loss, gradients and metrics, through
  both routes.
- Refusals, the import without trl, and the built wheel shipping lambda_grpo/integrations.

Everything runs on the tiny offline Llama of tests/_trl_tiny.py (built once per session).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("tokenizers")

from tests._trl_dist import LAMBDA_RUN  # noqa: E402
from tests._trl_tiny import PARITY, VARIANTS, build_tiny, run  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LOSS_TYPES = ["grpo", "bnpo", "dapo", "dr_grpo"]
DIGITS = 1e-6  # |ours - TRL| <= 1e-6 * max(|TRL|, 0.1): six significant digits


def rel_err(got, want):
    return abs(got - want) / max(abs(want), 0.1)


def assert_steps_match(ours, theirs, what):
    assert len(ours) == len(theirs) == PARITY["max_steps"], what
    for k, (a, b) in enumerate(zip(ours, theirs), 1):
        for key in ("loss", "grad_norm"):
            assert rel_err(a[key], b[key]) <= DIGITS, f"{what} step {k} {key}: ours {a[key]!r} TRL {b[key]!r}"
        # every metric TRL logs for the loss type (kl, entropy, clip_ratio/* or cispo_clip_ratio)
        for key in ("kl", "entropy", "clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean",
                    "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio", "vespo/phi_seq_mean"):
            if key in b:
                assert abs(a[key] - b[key]) <= 1e-5 * max(abs(b[key]), 1.0), f"{what} step {k} {key}"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("trl_tiny") / "model")


_TRL_RUNS = {}


def trl_steps(loss_type, tiny, tmp_path):
    if loss_type not in _TRL_RUNS:
        _TRL_RUNS[loss_type] = run("trl", loss_type, tmp_path / "trl", tiny)[0]
    return _TRL_RUNS[loss_type]


def digits(got, want):
    """Significant digits of agreement, relative to max(|want|, 0.1) (inf: identical)."""
    d = rel_err(got, want)
    return math.inf if d == 0 else -math.log10(d)


# ------------------------------------------------------------------------------------------------
# training parity, one process
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type,route", [(lt, "logprobs") for lt in LOSS_TYPES]
                         + [("dapo", "logits"), ("grpo", "logits")])
def test_parity_one_process(loss_type, route, tiny, tmp_path):
    want = trl_steps(loss_type, tiny, tmp_path)
    # the run really exercises what the parity is about
    assert max(s["clip_ratio/region_mean"] for s in want) > 0.1
    assert max(s["kl"] for s in want) > 0
    got, trainer = run("ours", loss_type, tmp_path / "ours", tiny, loss_route=route)
    assert trainer.accelerator.num_processes == 1
    assert_steps_match(got, want, f"{loss_type}/{route}")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parity_variants_one_process(name, tiny, tmp_path):
    """cispo, sapo, luspo, vespo, delta and the sequence-level ratio with TRL's default KL x ratio,
    computed by lambda_grpo: TRL's loss, grad_norm and metrics over 3 steps (log-prob route); the
    clip, CISPO's cap and delta bind, VESPO's weight moves."""
    loss_type, extra = VARIANTS[name]
    want = run("trl", loss_type, tmp_path / "trl", tiny, **extra)[0]
    assert max(s["kl"] for s in want) > 0
    if loss_type == "cispo":
        assert max(s["cispo_clip_ratio"] for s in want) > 0.02  # the cap binds
    elif loss_type == "vespo":
        assert max(abs(s["vespo/phi_seq_mean"] - 1) for s in want) > 0.01  # φ moves off 1
    elif loss_type != "sapo":
        assert max(s["clip_ratio/region_mean"] for s in want) > 0.1
    if "delta" in extra:  # the two-sided clip binds in this run: TRL's loss without it differs
        plain = run("trl", loss_type, tmp_path / "trl-no-delta", tiny,
                    **{k: v for k, v in extra.items() if k != "delta"})[0]
        assert max(rel_err(a["loss"], b["loss"]) for a, b in zip(plain, want)) > 1e3 * DIGITS
    got, trainer = run("ours", loss_type, tmp_path / "ours", tiny, **extra)
    assert trainer.loss_config.kl_ratio_weighted
    assert_steps_match(got, want, name)
    print(f"{name}: digits loss {min(digits(a['loss'], b['loss']) for a, b in zip(got, want)):.1f}, grad_norm "
          f"{min(digits(a['grad_norm'], b['grad_norm']) for a, b in zip(got, want)):.1f}; TRL's losses "
          f"{[round(s['loss'], 7) for s in want]}")


@pytest.mark.parametrize("route", ["logprobs", "logits"])
def test_lambda_grpo_at_zero_is_dapo_one_process(route, tiny, tmp_path):
    """λ-GRPO starts at λ = 0, where it is DAPO exactly: step 1 equals TRL's dapo step 1 (both
    routes); λ then moves, and evaluation (TRL's eval path) logs it."""
    from datasets import Dataset

    from tests._trl_tiny import PROMPTS

    want = trl_steps("dapo", tiny, tmp_path)
    got, trainer = run("ours", "lambda_grpo", tmp_path / "ours", tiny, max_steps=1, loss_route=route)
    assert rel_err(got[0]["loss"], want[0]["loss"]) <= DIGITS
    assert rel_err(got[0]["grad_norm"], want[0]["grad_norm"]) <= DIGITS
    assert got[0]["lambda"] == 0.0
    assert float(trainer.lam.detach()) != 0.0  # λ took its step
    if route == "logprobs":
        trainer.args.per_device_eval_batch_size = 4
        metrics = trainer.evaluate(Dataset.from_dict({"prompt": PROMPTS[:4]}))
        assert metrics["eval_lambda"] == float(trainer.lam.detach())
        assert math.isfinite(metrics["eval_loss"])


# ------------------------------------------------------------------------------------------------
# two processes: one torchrun launch for everything
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def dist(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("trl_dist")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    t = time.time()
    res = subprocess.run(torchrun + ["-m", "tests._trl_dist", tiny, str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    wall = time.time() - t
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-8000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    print(f"torchrun wall time {wall:.1f} s; per run: {ranks[0]['times']}")
    return ranks


@pytest.mark.parametrize("loss_type", LOSS_TYPES + list(VARIANTS))
def test_parity_two_processes(loss_type, dist):
    assert dist[0]["world"] == 2
    for r in dist:
        assert_steps_match(r[f"ours-{loss_type}"], r[f"trl-{loss_type}"], f"{loss_type}, 2 processes")
    # the logged loss is the mean over the ranks: both ranks log the same
    assert dist[0][f"ours-{loss_type}"][0]["loss"] == dist[1][f"ours-{loss_type}"][0]["loss"]


@pytest.mark.parametrize("name", ["lambda_grpo", "grpo_lambda"])
def test_lambda_two_processes(name, dist):
    r0, r1 = dist[0][name], dist[1][name]
    # λ moved, and is the same number on both ranks
    assert r0["lam"] != 0.0
    assert r0["lam"] == r1["lam"]
    assert r0["steps"][-1]["lambda"] == r1["steps"][-1]["lambda"] != 0.0
    # saved into checkpoint-2 and read back by both ranks on resume
    # (the "lambda" logged at step k is the λ step k used, i.e. the λ after step k - 1)
    assert r0["saved_ckpt2"] == r0["steps"][2]["lambda"] != 0.0
    assert r0["loaded"] == r1["loaded"] == [r0["saved_ckpt2"]]
    # the resumed run retrains step 3 from checkpoint-2 and ends where the uninterrupted run ended
    assert r0["resumed_lam"] == r1["resumed_lam"] == r0["lam"]
    assert rel_err(r0["resumed_steps"][-1]["loss"], r0["steps"][-1]["loss"]) <= DIGITS


def test_lambda_zero_first_step_is_dapo_two_processes(dist):
    want = dist[0]["trl-dapo-g16"][0]
    got = dist[0]["lambda_grpo"]["steps"][0]
    assert got["lambda"] == 0.0
    assert rel_err(got["loss"], want["loss"]) <= DIGITS
    assert rel_err(got["grad_norm"], want["grad_norm"]) <= DIGITS


@pytest.mark.parametrize("name", ["lambda_grpo", "grpo_lambda"])
def test_group_lengths_follow_rows_across_ranks(name, dist):
    """Every row the loss saw carries the true lengths of its G siblings, wherever they were."""
    G = LAMBDA_RUN["num_generations"]
    groups = defaultdict(dict)
    for rank, r in enumerate(dist):
        for row in r[name]["rows"]:
            key = (row["round"], tuple(row["prompt"]))
            assert row["gl"][row["gi"]] == row["n"]
            groups[key].setdefault(row["gi"], set()).add((row["n"], tuple(row["gl"]), rank))
    spread = 0
    for key, members in groups.items():
        assert sorted(members) == list(range(G)), key
        lengths = {gl for m in members.values() for (_, gl, _) in m}
        assert len(lengths) == 1, key  # every member carries the same sibling list
        (gl,) = lengths
        for gi, m in members.items():
            assert {n for (n, _, _) in m} == {gl[gi]}
        spread += len({rank for m in members.values() for (_, _, rank) in m}) > 1
    assert spread == len(groups) > 0, "with G = 16 every group spans both ranks"


# ------------------------------------------------------------------------------------------------
# one loss call with TRL's extra terms: same loss, gradients, metrics
# ------------------------------------------------------------------------------------------------
def _trainers(tiny, tmp_path, loss_type, route="logprobs", **extra):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from lambda_grpo.integrations.trl import LambdaGRPOConfig, LambdaGRPOTrainer

    from tests._trl_tiny import PROMPTS, reward_len

    cfg = dict(PARITY, loss_type=loss_type, output_dir=str(tmp_path), **extra)
    tok = AutoTokenizer.from_pretrained(tiny)
    data = Dataset.from_dict({"prompt": PROMPTS})
    out = []
    for cls, args in ((GRPOTrainer, GRPOConfig(**cfg)),
                      (LambdaGRPOTrainer, LambdaGRPOConfig(**cfg, loss_route=route))):
        t = cls(model=tiny, reward_funcs=reward_len, args=args, train_dataset=data, processing_class=tok)
        t.model.train()
        t.current_gradient_accumulation_steps = 2
        # only what _compute_loss reads: the importance ratio is in the inputs (not for vespo, where TRL
        # folds it into VESPO's weight and LambdaGRPOConfig hands the loss to TRL: see `delegated`)
        t.use_vllm = loss_type != "vespo"
        t.vllm_importance_sampling_correction = loss_type != "vespo"
        out.append(t)
    return out


def _inputs(trainer, tok_ids_seed=0):
    g = torch.Generator().manual_seed(tok_ids_seed)
    tok = trainer.processing_class
    enc = tok(["What is 1 + 2? The answer is", "What is 3 + 4?", "What is 5 + 6? The", "What is 7"] * 2,
              return_tensors="pt", padding=True)
    B, C = 8, 10
    ids = torch.randint(3, 300, (B, C), generator=g)
    lengths = torch.tensor([10, 3, 7, 1, 10, 5, 0, 8])
    cmask = (torch.arange(C)[None] < lengths[:, None]).long()
    ids = torch.where(cmask.bool(), ids, torch.full_like(ids, tok.pad_token_id))
    tool = torch.ones_like(cmask)
    tool[0, 4:6] = 0
    inputs = dict(prompt_ids=enc["input_ids"], prompt_mask=enc["attention_mask"], completion_ids=ids,
                  completion_mask=cmask, tool_mask=tool,
                  advantages=torch.randn(B, generator=g), num_items_in_batch=torch.tensor(60))
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], ids], 1),
            torch.cat([inputs["prompt_mask"], cmask], 1), C)
    inputs["old_per_token_logps"] = logp + 0.5 * torch.randn(B, C, generator=g)
    inputs["ref_per_token_logps"] = logp + 0.2 * torch.randn(B, C, generator=g)
    inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"] + 0.05 * torch.randn(B, C, generator=g)
    inputs["importance_sampling_ratio"] = torch.exp(0.1 * torch.randn(B, C, generator=g)).clamp(max=3.0)
    lm = (cmask * tool).sum(1)
    inputs["group_lengths"] = lm.view(2, 4).repeat_interleave(4, 0)
    inputs["group_index"] = torch.arange(B) % 4
    return inputs


def _loss_and_grads(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer._compute_loss(trainer.model, dict(inputs))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return float(loss), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type,route,extra", [
    ("dapo", "logprobs", dict(entropy_coef=0.05, top_entropy_quantile=0.5, off_policy_mask_threshold=0.02,
                              delta=1.5, epsilon_high=0.28)),
    ("grpo", "logprobs", dict(entropy_coef=0.05, off_policy_mask_threshold=0.02)),
    ("bnpo", "logprobs", dict(top_entropy_quantile=0.3, delta=2.0)),
    ("dr_grpo", "logprobs", dict(entropy_coef=0.01, delta=1.3, epsilon=0.1)),
    ("dapo", "logits", dict(delta=1.5)),
    ("dr_grpo", "logits", dict()),
    # issue 12: the loss types beyond the clip surrogate, KL x ratio (TRL's default) on
    ("cispo", "logprobs", dict(epsilon_high=1.3, use_bias_correction_kl=True, entropy_coef=0.05,
                               top_entropy_quantile=0.5, off_policy_mask_threshold=0.02)),
    ("cispo", "logits", dict(epsilon_high=1.3, use_bias_correction_kl=True)),
    ("sapo", "logprobs", dict(sapo_temperature_pos=1.5, sapo_temperature_neg=2.0, use_bias_correction_kl=True,
                              entropy_coef=0.05, off_policy_mask_threshold=0.02)),
    ("sapo", "logits", dict(use_bias_correction_kl=True)),
    ("luspo", "logprobs", dict(delta=1.5, use_bias_correction_kl=True, top_entropy_quantile=0.5)),
    ("luspo", "logits", dict(delta=1.5, use_bias_correction_kl=True)),
    ("dapo", "logprobs", dict(delta=1.5, epsilon_high=0.28, use_bias_correction_kl=True)),
    # the sequence-level ratio (GSPO) and VESPO
    ("grpo", "logprobs", dict(importance_sampling_level="sequence", use_bias_correction_kl=True, entropy_coef=0.05,
                              top_entropy_quantile=0.5, off_policy_mask_threshold=0.02)),
    ("luspo", "logits", dict(importance_sampling_level="sequence", use_bias_correction_kl=True)),
    ("cispo", "logprobs", dict(importance_sampling_level="sequence", epsilon_high=1.02)),
    ("vespo", "logprobs", dict(use_bias_correction_kl=True, entropy_coef=0.05, top_entropy_quantile=0.5,
                               off_policy_mask_threshold=0.02)),
    ("vespo", "logits", dict(vespo_k_pos=1.5, vespo_lambda_neg=1.5, use_bias_correction_kl=True)),
], ids=["dapo-all", "grpo-entropy-opm", "bnpo-topent-delta", "drgrpo-entropy-delta", "dapo-logits", "drgrpo-logits",
        "cispo-all", "cispo-logits", "sapo-entropy-opm", "sapo-logits", "luspo-topent-delta", "luspo-logits",
        "dapo-delta-klratio", "gspo-all", "luspo-seq-logits", "cispo-seq", "vespo-all", "vespo-logits"])
def test_one_loss_call_with_trl_extras(loss_type, route, extra, tiny, tmp_path):
    theirs, ours = _trainers(tiny, tmp_path, loss_type, route, **extra)
    # seed 0 has no token with A > 0 above CISPO's cap; seed 2 has 10 % of them
    inputs = _inputs(theirs, 2 if loss_type == "cispo" else 0)
    if loss_type == "vespo":  # TRL puts the vLLM ratio into the inputs only with its correction on
        inputs.pop("importance_sampling_ratio")
    l1, g1, m1 = _loss_and_grads(theirs, inputs)
    l2, g2, m2 = _loss_and_grads(ours, inputs)
    # VESPO's weight φ = exp(λ + k log w − λ w) depends on the row's summed log-ratio: through the logits
    # route (our logits kernel against TRL's fused head, fp32 log-probs ~1e-7 apart per token) φ moves
    # by up to |k − λw| · Σ_t δlogp, 5e-6 relative here; the log-prob route shares TRL's log-probs
    tol = 2e-5 if (loss_type, route) == ("vespo", "logits") else DIGITS
    assert rel_err(l2, l1) <= tol, (l2, l1)
    assert g1.keys() == g2.keys()
    scale = max(float(g.abs().max()) for g in g1.values())
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=10 * tol, atol=tol * scale, msg=n)
    assert m2.keys() >= m1.keys()
    for k in m1:
        assert m2[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-7), k
    # the case is not degenerate: the clip (or CISPO's cap) binds somewhere
    if loss_type == "cispo":
        assert m1["cispo_clip_ratio"] > 0
        assert not any(k.startswith("clip_ratio/") for k in m2)  # TRL's names for the loss type, not others
    elif loss_type == "sapo":
        assert not any(k.startswith("clip_ratio/") or k == "cispo_clip_ratio" for k in m2)
    elif loss_type == "vespo":
        assert abs(m1["vespo/phi_seq_mean"] - 1) > 0.01
    else:
        assert m1["clip_ratio/region_mean"] > 0
    assert ours.loss_config.kl_ratio_weighted == bool(extra.get("use_bias_correction_kl", False))


@pytest.mark.parametrize("option", ["delta", "use_bias_correction_kl"])
def test_options_change_the_loss(option, tiny, tmp_path):
    """delta and the KL x ratio act in these inputs: each changes the loss (so the parity above is not
    the parity of a no-op)."""
    base = dict(use_bias_correction_kl=False, beta=0.5)  # β large enough for the KL x ratio to show
    changed = dict(delta=1.5) if option == "delta" else dict(use_bias_correction_kl=True)
    _, a = _trainers(tiny, tmp_path / "a", "luspo", **base)
    _, b = _trainers(tiny, tmp_path / "b", "luspo", **dict(base, **changed))
    inputs = _inputs(a)
    la, lb = _loss_and_grads(a, inputs)[0], _loss_and_grads(b, inputs)[0]
    assert rel_err(lb, la) > 1e2 * DIGITS, (la, lb)


def test_lambda_grpo_loss_call_at_zero_is_dapo(tiny, tmp_path):
    """λ = 0 with group lengths from the inputs: TRL's dapo numbers; λ gets a gradient."""
    theirs, _ = _trainers(tiny, tmp_path / "a", "dapo")
    _, ours = _trainers(tiny, tmp_path / "b", "lambda_grpo")
    inputs = _inputs(theirs)
    l1, g1, _ = _loss_and_grads(theirs, inputs)
    l2, g2, m2 = _loss_and_grads(ours, inputs)
    assert rel_err(l2, l1) <= DIGITS
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-5, atol=1e-7)
    assert m2["lambda"] == 0.0
    assert float(ours._lam_grad) != 0.0


def test_delegated_loss_type_is_trls_own(tiny, tmp_path, monkeypatch):
    """The one delegated case (vespo with vLLM's ratio) needs vLLM to build a trainer; the delegation
    itself is checked by making `delegated` answer yes: the trainer then runs TRL's own loss."""
    from lambda_grpo.integrations import trl as lg_trl

    monkeypatch.setattr(lg_trl, "delegated", lambda args: "a test reason")
    theirs, ours = _trainers(tiny, tmp_path, "vespo")
    assert ours.loss_config is None and ours.lam is None
    inputs = _inputs(theirs)
    l1, g1, _ = _loss_and_grads(theirs, inputs)
    l2, g2, _ = _loss_and_grads(ours, inputs)
    assert l1 == l2


# ------------------------------------------------------------------------------------------------
# refusals and configuration
# ------------------------------------------------------------------------------------------------
def _config(**kw):
    from lambda_grpo.integrations.trl import LambdaGRPOConfig

    base = dict(output_dir="unused", use_cpu=True, bf16=False, per_device_train_batch_size=4, num_generations=4,
                report_to="none")
    return LambdaGRPOConfig(**dict(base, **kw))


@pytest.mark.parametrize("kw,match", [
    (dict(loss_type="cispo", delta=2.0), "delta with loss_type='cispo'"),
    (dict(loss_type="sapo", dual_clip=3.0), "dual_clip with loss_type='sapo'"),
    (dict(loss_type="cispo", epsilon_high=0.0), "eps_high"),
    (dict(loss_type="sapo", sapo_temperature_neg=0.0), "sapo_tau_neg"),
    (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
    (dict(delta=1.1), "delta=1.1 <= 1 \\+ epsilon_high"),
    (dict(delta=2.0, dual_clip=3.0), "same clip"),
    (dict(loss_type="dr_grpo", max_completion_length=None), "max_completion_length"),
    (dict(loss_route="logits", entropy_coef=0.01), "entropy_coef"),
    (dict(loss_route="logits", top_entropy_quantile=0.2), "top_entropy_quantile"),
    (dict(loss_route="logits", off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
    (dict(loss_type="vespo", use_vllm=True, adv_clamp_min=-0.1), "TRL's own"),
    (dict(loss_type="vespo", trace="recent"), "trace_mode"),
    (dict(loss_type="vespo", importance_sampling_level="sequence"), "VESPO builds its own sequence weight"),
    (dict(loss_type="vespo", delta=2.0), "delta with loss_type='vespo'"),
    (dict(importance_sampling_level="sequence", trace="recent"), "importance_sampling"),
    (dict(importance_sampling_level="batch"), "importance_sampling"),
    (dict(loss_type="gspo"), "loss_type"),
    (dict(trace="all"), "trace"),
    (dict(trace_mode="both"), "trace_mode"),
    (dict(trace_decay=1.5), "trace_decay"),
    (dict(dual_clip=0.5), "dual_clip"),
    (dict(loss_route="hidden"), "loss_route"),
    (dict(loss_backend="cuda"), "loss_backend"),
    (dict(lambda_lr=-1.0), "lambda_lr"),
    (dict(lambda_init=float("nan")), "lambda_init"),
])
def test_config_refusals(kw, match):
    with pytest.raises(ValueError, match=match):
        _config(**kw)


def test_config_accepts_and_maps():
    c = _config(loss_type="lambda_grpo", trace="both", trace_decay=0.95, adv_clamp_min=-0.1, epsilon_high=0.28,
                delta=2.0, beta=0.04, use_bias_correction_kl=False, temperature=0.7)
    lc = c.loss_config()
    assert (lc.aggregation, lc.trace, lc.trace_decay, lc.adv_clamp_min) == ("lambda_grpo", "both", 0.95, -0.1)
    assert (lc.eps_low, lc.eps_high, lc.dual_clip, lc.delta, lc.beta, lc.temperature) == (0.2, 0.28, None, 2.0, 0.04,
                                                                                           0.7)
    assert (lc.surrogate, lc.kl_ratio_weighted, lc.dual_floor) == ("clip", False, 2.0)
    assert lc.max_completion_length is None
    assert _config(loss_type="dr_grpo", max_completion_length=77).loss_config().max_completion_length == 77
    # TRL's default use_bias_correction_kl=True is the KL x ratio
    assert _config(beta=0.04).loss_config().kl_ratio_weighted
    # the loss types beyond the clip surrogate: aggregation (TRL's normaliser) and surrogate
    cispo = _config(loss_type="cispo", epsilon_high=5.0).loss_config()
    assert (cispo.aggregation, cispo.surrogate, cispo.eps_high) == ("dapo", "cispo", 5.0)
    assert _config(loss_type="cispo").loss_config().eps_high == 0.2  # TRL: epsilon_high defaults to epsilon
    sapo = _config(loss_type="sapo", sapo_temperature_pos=1.5, sapo_temperature_neg=2.0).loss_config()
    assert (sapo.aggregation, sapo.surrogate, sapo.sapo_tau_pos, sapo.sapo_tau_neg) == ("grpo", "sapo", 1.5, 2.0)
    luspo = _config(loss_type="luspo", delta=1.5, importance_sampling_level="sequence").loss_config()
    assert (luspo.aggregation, luspo.surrogate, luspo.delta) == ("seq_mean_token_sum", "clip", 1.5)
    assert luspo.importance_sampling == "sequence"
    vespo = _config(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5,
                    vespo_lambda_neg=1.5).loss_config()
    assert (vespo.aggregation, vespo.surrogate, vespo.importance_sampling) == ("dapo", "vespo", "token")
    assert (vespo.vespo_k_pos, vespo.vespo_lambda_pos, vespo.vespo_k_neg, vespo.vespo_lambda_neg) == (1.5, 2.5, 2.5,
                                                                                                      1.5)
    # vespo with vLLM's importance ratio is TRL's own loss
    from lambda_grpo.integrations.trl import delegated

    assert delegated(_config(loss_type="vespo", use_vllm=True)) and not delegated(_config(loss_type="vespo"))
    with pytest.raises(ValueError, match="computed by TRL"):
        _config(loss_type="vespo", use_vllm=True).loss_config()
    assert (c.lambda_lr, c.lambda_init, c.loss_route, c.loss_backend) == (0.1, 0.0, "logprobs", "auto")


def test_trainer_wants_our_config(tiny):
    from trl import GRPOConfig

    from lambda_grpo.integrations.trl import LambdaGRPOTrainer

    with pytest.raises(TypeError, match="LambdaGRPOConfig"):
        LambdaGRPOTrainer(model=tiny, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=GRPOConfig(output_dir="unused", use_cpu=True, bf16=False))


def test_delegated_warns_about_unused_fields(tiny, tmp_path, monkeypatch):
    from datasets import Dataset

    from lambda_grpo.integrations import trl as lg_trl
    from lambda_grpo.integrations.trl import LambdaGRPOConfig, LambdaGRPOTrainer
    from tests._trl_tiny import reward_len

    args = LambdaGRPOConfig(**dict(PARITY, loss_type="vespo", output_dir=str(tmp_path), lambda_lr=1.0))
    monkeypatch.setattr(lg_trl, "delegated", lambda args: "a test reason")
    with pytest.warns(UserWarning, match="lambda_lr have no effect"):
        LambdaGRPOTrainer(model=tiny, reward_funcs=reward_len, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a"] * 4}))


def test_imports_without_trl():
    """The package imports without trl; the adapter says what to install."""
    code = ("import sys; sys.modules['trl'] = None\n"
            "import lambda_grpo.integrations\n"
            "try:\n    import lambda_grpo.integrations.trl\nexcept ImportError as e:\n    print('ERR', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "ERR" in res.stdout and "lambda-grpo[trl]" in res.stdout


def test_wheel_ships_integrations(tmp_path):
    """pyproject lists its packages explicitly: the built wheel must contain the adapter."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "lambda_grpo", src / "lambda_grpo", ignore=shutil.ignore_patterns("__pycache__"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (whl,) = (tmp_path / "dist").glob("lambda_grpo-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    assert {"lambda_grpo/integrations/__init__.py", "lambda_grpo/integrations/trl.py"} <= names
    # the kernels ship as lambda_grpo.kernels, never as a top-level `kernels` (issue 16)
    assert {"lambda_grpo/kernels/__init__.py", "lambda_grpo/kernels/vocab_fused.py"} <= names
    assert not any(n.startswith("kernels/") for n in names), sorted(names)[:10]
    # installed from the wheel, imported from a scratch directory: the wheel's lambda_grpo.kernels
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(whl)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(site))
    res = subprocess.run([sys.executable, "-c", "import lambda_grpo.kernels._config as c; print(c.__file__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().startswith(str(site)), (res.stdout, res.stderr[-2000:])
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(whl).read(meta).decode()
    assert 'Provides-Extra: trl' in text and "trl<1.17,>=1.16; extra == \"trl\"" in text



@pytest.mark.parametrize("constant", [True, False])
def test_warns_when_no_group_has_reward_variance(constant, tiny, tmp_path, caplog):
    """A step whose groups all have equal rewards has zero advantages, so loss, gradient and dλ are
    exactly 0 and λ cannot move: the trainer says so in a logged warning (issue 16 point 5); a step
    with reward variance logs nothing of the kind."""
    import logging

    from datasets import Dataset
    from transformers import AutoTokenizer

    from lambda_grpo.integrations.trl import LambdaGRPOConfig, LambdaGRPOTrainer
    from tests._trl_tiny import PROMPTS, reward_len

    def reward_constant(completions, **kw):
        return [1.0 for _ in completions]

    cfg = dict(PARITY, loss_type="lambda_grpo", output_dir=str(tmp_path), max_steps=1, num_iterations=1)
    trainer = LambdaGRPOTrainer(model=tiny, reward_funcs=reward_constant if constant else reward_len,
                                args=LambdaGRPOConfig(**cfg), train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                                processing_class=AutoTokenizer.from_pretrained(tiny))
    with caplog.at_level(logging.WARNING, logger="lambda_grpo.integrations.trl"):
        trainer.train()
    said = [r.getMessage() for r in caplog.records if "no reward variance" in r.getMessage()]
    step = [h for h in trainer.state.log_history if "loss" in h][0]
    if constant:
        assert said and "λ stays at 0" in said[0], caplog.text[-2000:]
        assert step["loss"] == 0.0 and step["grad_norm"] == 0.0 and float(trainer.lam.detach()) == 0.0
    else:
        assert not said and step["frac_reward_zero_std"] < 1.0
