"""The GRPO trainer end to end on a tiny Llama and a char-level tokenizer built in code (no downloads)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from lambda_grpo import LossConfig, token_logprobs  # noqa: E402
from lambda_grpo.trainer import GRPOTrainer, TrainConfig  # noqa: E402
from lambda_grpo.trainer.cli import build_parser, config_from_args, main  # noqa: E402
from lambda_grpo.trainer.data import arithmetic_problems  # noqa: E402
from lambda_grpo.trainer.model import pick_attention  # noqa: E402
from lambda_grpo.trainer.rewards import answers_match, extract_number  # noqa: E402

CHARS = list("0123456789+-*= ")
TIMING = {"step_time", "gen_time", "tokens_per_s", "eval_time"}


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _tiny_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    tok = _tiny_tokenizer()
    _tiny_model(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _args(model_dir, out, *extra):
    # No system prompt, no chat template: the prompt is "a + b=" in the tiny vocabulary. The format
    # reward gives a random tiny model a reward signal with variance inside its groups.
    # --threads 1: the thread count is pinned (bit-exact comparisons must not depend on the
    # machine's load, which the default 0 consults).
    return ["--model", str(model_dir), "--output-dir", str(out), "--threads", "1", "--system-prompt", "none",
            "--prompt-template", "{question}=", "--max-value", "5", "--num-train", "24", "--num-eval", "6",
            "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "5", "--micro-batch-prompts", "1",
            "--format-weight", "1.0", "--lr", "3e-3", "--lambda-lr", "5.0", "--no-progress", "--quiet", *extra]


def _cfg(model_dir, out, *extra) -> TrainConfig:
    return config_from_args(build_parser().parse_args(_args(model_dir, out, *extra)))


def _train_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in line]


def test_cli_trains_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(model_dir, out, "--steps", "4", "--trace", "recent")) == 0
    printed = capsys.readouterr().out
    assert "held-out greedy accuracy: before" in printed and "curves.png" in printed
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("reward", "accuracy", "completion_len", "clip_frac", "clip_frac_low", "clip_frac_high",
                "entropy_mean", "lambda", "grad_norm", "step_time", "tokens_per_s", "lr"):
        assert all(r.get(key) is not None for r in rows), key
    assert any(r["reward_std"] > 0 for r in rows), "the test set-up must give a reward signal"
    # lambda moves: it starts at 0 and gets a true gradient whenever lengths and advantages vary.
    assert abs(rows[-1]["lambda"]) > 1e-4
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["eval_before"] <= 1 and 0 <= summary["eval_after"] <= 1
    assert len((out / "eval_after.jsonl").read_text().splitlines()) == 6


def test_console_script_entry(model_dir, tmp_path, capsys):
    from lambda_grpo.cli import main as console_main

    with pytest.raises(SystemExit) as e:
        console_main(["train", "--help"])
    assert e.value.code == 0
    assert "--aggregation" in capsys.readouterr().out
    assert console_main(["train"] + _args(model_dir, tmp_path / "c", "--steps", "1", "--num-eval", "0",
                                          "--no-plot")) == 0
    assert len(_train_rows(tmp_path / "c")) == 1


def test_every_loss_config_field_is_a_flag():
    from dataclasses import fields

    p = build_parser()
    flags = {s for a in p._actions for s in a.option_strings}
    for f in fields(LossConfig):
        assert "--" + f.name.replace("_", "-") in flags, f.name
    cfg = config_from_args(p.parse_args(["--aggregation", "dapo", "--eps-high", "0.28", "--trace", "both",
                                         "--trace-mode", "weight", "--adv-clamp-min", "-0.1", "--dual-clip", "3",
                                         "--beta", "0.04", "--kl-estimator", "k2", "--max-completion-length", "7",
                                         "--no-compute-entropy"]))
    assert cfg.loss == LossConfig(aggregation="dapo", eps_high=0.28, trace="both", trace_mode="weight",
                                  adv_clamp_min=-0.1, dual_clip=3.0, beta=0.04, kl_estimator="k2",
                                  max_completion_length=7, compute_entropy=False)


def test_resume_is_exact(model_dir, tmp_path):
    # mu = 2 and two mini-batches exercise the behaviour log-probs; beta > 0 the frozen reference.
    extra = ("--steps", "3", "--num-iterations", "2", "--num-mini-batches", "2", "--beta", "0.05",
             "--num-eval", "0", "--no-plot")
    full = tmp_path / "full"
    GRPOTrainer(_cfg(model_dir, full, *extra, "--save-every", "2")).train()
    part = tmp_path / "part"
    shutil.copytree(full, part)
    resumed = GRPOTrainer(_cfg(model_dir, part, *extra, "--resume", str(part / "checkpoint-2")))
    assert resumed.step == 2
    resumed.train()
    a, b = _train_rows(full), _train_rows(part)
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in a[-1]:
        if key not in TIMING:
            assert a[-1][key] == b[-1][key], key
    assert a[-1]["kl_mean"] is not None and a[-1]["kl_mean"] > 0
    # a different seed gives a different run (the check above can fail)
    other = tmp_path / "other"
    GRPOTrainer(_cfg(model_dir, other, *extra, "--seed", "1")).train()
    assert _train_rows(other)[-1]["loss"] != a[-1]["loss"]


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step:UserWarning")  # our recording wrapper
@pytest.mark.parametrize("aggregation", ["lambda_grpo", "grpo", "dr_grpo"])
def test_gradient_accumulation_matches_one_big_batch(model_dir, tmp_path, aggregation):
    """Global normalisers: micro-batches of 1 group give the same gradient as one micro-batch of 2."""
    grads = []
    for micro in ("1", "2"):
        t = GRPOTrainer(_cfg(model_dir, tmp_path / micro, "--steps", "1", "--num-eval", "0", "--no-plot",
                             "--aggregation", aggregation, "--micro-batch-prompts", micro, "--max-grad-norm", "0"))
        seen = []
        step = t.optimizer.step

        def record(*a, _step=step, _seen=seen, _t=t, **k):
            _seen.append(torch.cat([p.grad.flatten() for p in _t.model.parameters()]))
            lam = _t.loss_fn.lam
            _seen.append(None if lam is None else lam.grad.clone())
            return _step(*a, **k)

        t.optimizer.step = record
        t.train()
        grads.append(seen)
    (g1, l1), (g2, l2) = grads
    assert g1.abs().max() > 0
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6 * float(g1.abs().max()))
    if l1 is not None:
        torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-8)


def _recorded_steps(t):
    """Wrap t.optimizer.step: every optimiser step records (gradients by parameter name, lambda's gradient)."""
    seen = []
    step = t.optimizer.step

    def record(*a, **k):
        grads = {n: p.grad.detach().clone() for n, p in t.model.named_parameters() if p.grad is not None}
        lam = t.loss_fn.lam
        seen.append((grads, None if lam is None or lam.grad is None else lam.grad.detach().clone()))
        return step(*a, **k)

    t.optimizer.step = record
    return seen


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step:UserWarning")  # our recording wrapper
@pytest.mark.parametrize("head", ["tied", "untied_bias"])
def test_hidden_route_matches_logits_route(model_dir, tmp_path, head):
    """loss_route='hidden' (backbone + GRPOLoss.forward_hidden with the LM head's weight) gives the
    loss, the parameter gradients (the tied embedding / LM-head weight included: reached once, by
    both of its uses) and lambda's gradient of loss_route='logits', in float64, with mu = 2 and
    beta > 0 so that the behaviour and reference log-probs also come from the hidden states."""
    tok = _tiny_tokenizer()
    runs = {}
    for route in ("logits", "hidden"):
        model = _tiny_model(len(tok)).double()
        if head == "untied_bias":
            torch.manual_seed(1)
            lm = torch.nn.Linear(32, len(tok), bias=True, dtype=torch.float64)
            model.lm_head = lm
            model.config.tie_word_embeddings = False
            assert model.get_output_embeddings() is lm
        else:
            assert model.lm_head.weight is model.model.embed_tokens.weight
        cfg = _cfg(model_dir, tmp_path / route, "--steps", "1", "--num-eval", "0", "--no-plot", "--num-iterations",
                   "2", "--beta", "0.05", "--max-grad-norm", "0", "--loss-route", route)
        t = GRPOTrainer(cfg, model=model, tokenizer=tok)
        seen = _recorded_steps(t)
        t.train()
        runs[route] = (seen, _train_rows(tmp_path / route)[-1])
    (a, ma), (b, mb) = runs["logits"], runs["hidden"]
    assert len(a) == len(b) == 2
    assert ma["reward_std"] > 0 and ma["kl_mean"] is not None
    for key in ("loss", "lambda", "lambda_grad", "grad_norm", "kl_mean", "entropy_mean", "clip_frac"):
        assert mb[key] == pytest.approx(ma[key], rel=1e-9, abs=1e-12), key
    for (ga, la), (gb, lb) in zip(a, b):
        assert ga.keys() == gb.keys()
        names = ["lm_head.weight"] if head == "untied_bias" else ["model.embed_tokens.weight"]
        names += ["lm_head.bias"] if head == "untied_bias" else []
        for n in names:
            assert n in ga and ga[n].abs().max() > 0, n
        for n in ga:
            torch.testing.assert_close(gb[n], ga[n], rtol=1e-9, atol=1e-12 * float(ga[n].abs().max()))
        torch.testing.assert_close(lb, la, rtol=1e-9, atol=1e-14)


def test_hidden_route_refuses_a_model_that_post_processes_its_logits(model_dir, tmp_path):
    """A model whose logits are not lm_head(last hidden state) (soft-capping, scaling) would be
    trained on other log-probs than it samples from: the hidden route refuses it at start."""
    tok = _tiny_tokenizer()
    model = _tiny_model(len(tok))
    forward = model.forward

    def capped(*a, **k):
        out = forward(*a, **k)
        out.logits = 30.0 * torch.tanh(out.logits / 30.0)  # Gemma-2-style soft-capping
        return out

    model.forward = capped
    with pytest.raises(ValueError, match="loss_route: 'hidden' needs logits == lm_head"):
        GRPOTrainer(_cfg(model_dir, tmp_path / "h", "--steps", "0", "--num-eval", "0"), model=model, tokenizer=tok)
    GRPOTrainer(_cfg(model_dir, tmp_path / "l", "--steps", "0", "--num-eval", "0", "--loss-route", "logits"),
                model=model, tokenizer=tok)


def test_logits_are_aligned_with_completion_tokens(model_dir, tmp_path):
    """logits[b, t] scores completion token t, with left-padded prompts of different lengths."""
    t = GRPOTrainer(_cfg(model_dir, tmp_path / "a", "--steps", "0", "--num-eval", "0", "--no-plot"))
    prompts = ["1 + 2=", "13 - 4 + 5="]
    g = t.generate(prompts, 2, sample=True)
    logits = t._logits(t.model, g["prompt_ids"], g["prompt_mask"], g["completion_ids"], g["completion_mask"])
    lp = token_logprobs(logits, g["completion_ids"])
    with torch.no_grad():
        for b in range(len(g["texts"])):
            p = g["prompt_ids"][b][g["prompt_mask"][b].bool()]
            c = g["completion_ids"][b][g["completion_mask"][b].bool()]
            full = t.model(torch.cat([p, c])[None]).logits[0].log_softmax(-1)
            want = full[len(p) - 1:len(p) - 1 + len(c)].gather(1, c[:, None])[:, 0]
            torch.testing.assert_close(lp[b, :len(c)], want, rtol=1e-4, atol=1e-5)


def test_bad_configs_raise_clear_value_errors(model_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="group_size"):
        TrainConfig(group_size=1)
    with pytest.raises(ValueError, match="num_mini_batches"):
        TrainConfig(prompts_per_step=3, num_mini_batches=2)
    with pytest.raises(ValueError, match="lambda_optimizer"):
        TrainConfig(lambda_optimizer="rmsprop")
    with pytest.raises(ValueError, match="aggregation"):
        config_from_args(build_parser().parse_args(["--aggregation", "ppo"]))
    with pytest.raises(ValueError, match="data_path"):
        TrainConfig(task="file")
    with pytest.raises(SystemExit) as e:  # the CLI turns config errors into a usage error
        main(["--trace-decay", "1.5"])
    assert e.value.code == 2 and "trace_decay" in capsys.readouterr().err
    with pytest.raises(ValueError, match="model.*no such directory"):
        GRPOTrainer(TrainConfig(model=str(tmp_path / "missing"), output_dir=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="data_path"):
        GRPOTrainer(_cfg(model_dir, tmp_path / "f", "--task", "file", "--data-path", str(tmp_path / "nope.jsonl")))
    with pytest.raises(ValueError, match="resume"):
        GRPOTrainer(_cfg(model_dir, tmp_path / "r", "--resume", "latest"))


def test_local_jsonl_task(model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1=", "answer": str(i + 1)}) + "\n" for i in range(20)))
    t = GRPOTrainer(_cfg(model_dir, tmp_path / "j", "--task", "file", "--data-path", str(data), "--steps", "2",
                         "--num-eval", "4", "--no-plot", "--trainable-layers", "1"))
    assert len(t.eval_ds) == 4 and len(t.train_ds) == 16
    assert not set(t.eval_ds["question"]) & set(t.train_ds["question"])
    frozen = t.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    top = t.model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    t.train()
    assert torch.equal(frozen, t.model.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(top, t.model.model.layers[1].self_attn.q_proj.weight)


def test_arithmetic_split_and_answers():
    cfg = TrainConfig(min_value=1, max_value=9, ops="+-*", num_terms=2, num_train=100, num_eval=30)
    probs = arithmetic_problems(cfg)
    assert len(probs) == len(set(probs)) == 130
    for q, a in probs:
        x, op, y = q.split()
        assert int(a) == {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op]


def test_rewards_and_attention_choice():
    assert extract_number("13 + 14 = 27.") == "27"
    assert extract_number("it is -3") == "-3"
    assert extract_number("1,024 apples") == "1024"
    assert extract_number("no number") is None
    assert answers_match("27", "27") and answers_match("27.0", "27") and not answers_match("28", "27")
    assert not answers_match(None, "1")
    assert pick_attention(torch.device("cpu")) == "sdpa"


# --------------------------------------------------------------------------------------------
# Process-wide state: the trainer restores the thread count (issue 8, "a suite that no load can fail")
# --------------------------------------------------------------------------------------------

def test_trainer_restores_the_thread_count(model_dir, tmp_path):
    before = torch.get_num_threads()
    want = 2 if before != 2 else 1
    seen = []
    t = GRPOTrainer(_cfg(model_dir, tmp_path / "t", "--steps", "1", "--num-eval", "2", "--no-plot",
                         "--threads", str(want)))
    assert torch.get_num_threads() == before  # construction changes nothing
    step = t.train_step

    def spy():
        seen.append(torch.get_num_threads())
        return step()

    t.train_step = spy
    t.train()
    assert seen == [want]  # the run used the asked-for count ...
    assert torch.get_num_threads() == before  # ... and gave the process its own back
    t.evaluate("again")
    assert torch.get_num_threads() == before


# --------------------------------------------------------------------------------------------
# CLI user errors (issue 8, finding 7): one line naming the flag or file, exit code 2, no
# traceback, before the model is loaded
# --------------------------------------------------------------------------------------------

def _no_model_loading(monkeypatch):
    import lambda_grpo.trainer.loop as loop

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the user error was reported")

    monkeypatch.setattr(loop, "load_model_and_tokenizer", refuse)


def _cli_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _files(tmp_path):
    files = {
        "bad.jsonl": '{"prompt": "1 + 1=", "answer": "2"}\n{"prompt": "2 + 2=", "answer": 4\n',
        "nocol.jsonl": '{"prompt": "1 + 1="}\n',
        "notobj.jsonl": '[1, 2]\n',
        "empty.jsonl": "\n",
        "bad.parquet": "not a parquet file",
        "data.csv": "prompt,answer\n",
        "unknown.json": '{"lr": 1e-4, "stpes": 3}',
        "unknown_loss.json": '{"loss": {"aggregaton": "dapo"}}',
        "malformed.json": '{"lr": 1e-4,, }',
        "list.json": "[1, 2]",
        "badvalue.json": '{"loss": {"aggregation": "ppo"}}',
        "badtype.json": '{"steps": "10"}',
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


CLI_ERRORS = [
    # (argv with {d} = the files' directory, the flag the line must name, a fragment it must show)
    (["--task", "file", "--data-path", "{d}/bad.jsonl"], "--data-path", "bad.jsonl: line 2"),
    (["--task", "file", "--data-path", "{d}/nocol.jsonl"], "--data-path", "'answer'"),
    (["--task", "file", "--data-path", "{d}/notobj.jsonl"], "--data-path", "notobj.jsonl: line 1"),
    (["--task", "file", "--data-path", "{d}/empty.jsonl"], "--data-path", "none"),
    (["--task", "file", "--data-path", "{d}/bad.parquet"], "--data-path", "bad.parquet"),
    (["--task", "file", "--data-path", "{d}/data.csv"], "--data-path", "'.csv'"),
    (["--task", "file", "--data-path", "{d}/missing.jsonl"], "--data-path", "missing.jsonl"),
    (["--task", "file"], "--data-path", "None"),
    (["--data-path", "{d}/bad.jsonl"], "--data-path", "--task arithmetic"),
    (["--config", "{d}/missing.json"], "--config", "missing.json"),
    (["--config", "{d}"], "--config", "directory"),
    (["--config", "{d}/unknown.json"], "--config", "'stpes' (did you mean 'steps'?)"),
    (["--config", "{d}/unknown_loss.json"], "--config", "'loss.aggregaton'"),
    (["--config", "{d}/malformed.json"], "--config", "line 1 column 13"),
    (["--config", "{d}/list.json"], "--config", "list"),
    (["--config", "{d}/badvalue.json"], "--config", "aggregation: expected one of"),
    (["--config", "{d}/badtype.json"], "--config", "steps: expected an int >= 0, got '10'"),
    (["--lr", "abc"], "--lr", "'abc'"),
    (["--lambda-lr", "-1"], "--lambda-lr", "-1.0"),
    (["--adam-beta2", "1.5"], "--adam-beta2", "1.5"),
    (["--trace-decay", "1.5"], "--trace-decay", "1.5"),
    (["--aggregation", "ppo"], "--aggregation", "'ppo'"),
    (["--loss-route", "fused"], "--loss-route", "'fused'"),
    (["--generation-batch-prompts", "3"], "--generation-batch-prompts", "divisor of the prompts per mini-batch = 4"),
    (["--bogus", "1"], "--bogus", "unrecognized"),
    (["--preset", "nope"], "--preset", "'nope'"),
    (["--model", "{d}/no_model"], "--model", "no_model"),
    (["--model", "{d}"], "--model", "config.json"),
    (["--device", "cuda:7"], "--device", "cuda:7"),
    (["--resume", "latest", "--output-dir", "{d}/out"], "--resume", "checkpoint-*"),
    (["--resume", "{d}/nowhere"], "--resume", "nowhere"),
    (["--output-dir", "{d}/bad.jsonl"], "--output-dir", "existing file"),
    (["--compare", "--methods", "grpo,ppo"], "--methods", "'grpo,ppo'"),
    (["--compare", "--seeds", "0,x"], "--seeds", "'0,x'"),
]


@pytest.mark.parametrize("argv,flag,fragment", CLI_ERRORS, ids=[" ".join(c[0]) for c in CLI_ERRORS])
def test_cli_user_errors_are_one_line_before_the_model_loads(argv, flag, fragment, tmp_path, capsys, monkeypatch,
                                                              model_dir):
    if argv[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    _no_model_loading(monkeypatch)
    d = _files(tmp_path)
    # a valid model directory unless the case is about the model: the error must come from the flag
    base = [] if "--model" in argv else ["--model", str(model_dir)]
    line = _cli_error(capsys, base + [a.replace("{d}", str(d)) for a in argv])
    assert line.startswith("python -m lambda_grpo.train: error: "), line
    assert flag in line and fragment in line, line


WORLD_ERRORS = [
    # under torchrun (WORLD_SIZE=2): rules that hold for one process but not for two
    (["--prompts-per-step", "3", "--micro-batch-prompts", "1"], "--prompts-per-step",
     "multiple of num_mini_batches x processes = 1 x 2"),
    (["--prompts-per-step", "4", "--num-mini-batches", "4"], "--prompts-per-step", "= 4 x 2"),
    (["--prompts-per-step", "12", "--micro-batch-prompts", "4"], "--micro-batch-prompts", "= 6"),
    (["--prompts-per-step", "12", "--generation-batch-prompts", "4"], "--generation-batch-prompts", "= 6"),
    (["--compare"], "--compare", "WORLD_SIZE=2"),
]


@pytest.mark.parametrize("argv,flag,fragment", WORLD_ERRORS, ids=[" ".join(c[0]) for c in WORLD_ERRORS])
def test_cli_user_errors_under_torchrun(argv, flag, fragment, tmp_path, capsys, monkeypatch, model_dir):
    _no_model_loading(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = _cli_error(capsys, ["--model", str(model_dir), "--output-dir", str(tmp_path / "o"), *argv])
    assert line.startswith("python -m lambda_grpo.train: error: "), line
    assert flag in line and fragment in line, line
    monkeypatch.setenv("WORLD_SIZE", "two")
    line = _cli_error(capsys, ["--model", str(model_dir), "--output-dir", str(tmp_path / "o")])
    assert "WORLD_SIZE: expected a positive int" in line, line


def test_cli_backend_triton_without_cuda_or_interpreter(model_dir, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: backend='triton' is valid")
    _no_model_loading(monkeypatch)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    line = _cli_error(capsys, ["--model", str(model_dir), "--backend", "triton"])
    assert "--backend" in line and "TRITON_INTERPRET=1" in line, line


def test_library_reports_a_bad_data_file_before_loading_the_model(tmp_path, monkeypatch):
    _no_model_loading(monkeypatch)
    d = _files(tmp_path)
    with pytest.raises(ValueError, match=r"^data_path: .*bad.jsonl: line 2"):
        GRPOTrainer(TrainConfig(task="file", data_path=str(d / "bad.jsonl"), output_dir=str(tmp_path / "o")))


def test_jsonl_answers_of_mixed_types_are_read(model_dir, tmp_path):
    # the JSONL reader is our own (no datasets loader): answers of mixed JSON types (3, "4") are strings
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1=", "answer": i + 1 if i % 2 else str(i + 1)}) + "\n"
                            for i in range(8)))
    t = GRPOTrainer(_cfg(model_dir, tmp_path / "m", "--task", "file", "--data-path", str(data), "--steps", "0",
                         "--num-eval", "2", "--no-plot"))
    assert sorted(list(t.train_ds["answer"]) + list(t.eval_ds["answer"]), key=int) == [str(i + 1) for i in range(8)]


@pytest.mark.parametrize("entry", ["module", "console"])
def test_cli_entry_points_exit_2_with_one_line(entry, tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"\n')
    if entry == "module":
        cmd = [sys.executable, "-m", "lambda_grpo.train"]
    else:
        cmd = [sys.executable, "-c", "import sys; from lambda_grpo.cli import main; sys.exit(main())", "train"]
    for args, fragment in ((["--config", str(tmp_path / "missing.json")], "--config"),
                           (["--task", "file", "--data-path", str(tmp_path / "bad.jsonl")], "--data-path")):
        res = subprocess.run(cmd + args, capture_output=True, text=True, timeout=600, env=dict(os.environ))
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and fragment in lines[0], res.stderr[-2000:]
    if entry == "console":
        for argv, fragment in (([], "expected a command"), (["trian"], "unknown command 'trian'")):
            res = subprocess.run(cmd[:-1] + argv, capture_output=True, text=True, timeout=600)
            lines = res.stderr.strip().splitlines()
            assert res.returncode == 2 and len(lines) == 1 and fragment in lines[0], res.stderr


# --------------------------------------------------------------------------------------------
# Data parallel (issue 11 point 3): torchrun --nproc_per_node 2 trains the step one process trains
# --------------------------------------------------------------------------------------------

def _torchrun(nproc: int, script, *args, timeout: int = 600):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step:UserWarning")  # the recording wrapper
def test_two_processes_train_the_same_step_as_one(model_dir, tmp_path):
    """`torchrun --standalone --nproc_per_node 2` (gloo, CPU) and one process on the same global
    batch: the same completions (bit for bit), the same loss, gradients (model and lambda, at each
    of the two optimiser steps of two mini-batches), parameters and lambda after the step, the same
    logged metrics and held-out evaluation. lambda-GRPO with beta > 0 (reference log-probs) and two
    mini-batches (behaviour log-probs); each process trains one prompt of each mini-batch."""
    from pathlib import Path

    from tests._dist_step import record

    extra = ("--steps", "1", "--prompts-per-step", "4", "--num-mini-batches", "2", "--beta", "0.05",
             "--num-eval", "4", "--eval-batch-size", "2", "--no-plot")
    one, two = tmp_path / "one", tmp_path / "two"
    assert record(str(tmp_path / "one"), _args(model_dir, one, *extra)) == 0
    res = _torchrun(2, Path(__file__).parent / "_dist_step.py", tmp_path / "two", *_args(model_dir, two, *extra))
    assert res.returncode == 0, res.stderr[-4000:]
    a = torch.load(tmp_path / "one.rank0.pt", weights_only=False)
    b0, b1 = (torch.load(tmp_path / f"two.rank{r}.pt", weights_only=False) for r in (0, 1))
    assert (a["world"], b0["world"], b1["rank"]) == (1, 2, 1)

    # the same completions, generated by the process that owns each prompt
    assert set(a["rollouts"]) == set(b0["rollouts"]) | set(b1["rollouts"]) and not set(b0["rollouts"]) & set(
        b1["rollouts"])
    for key, (ids, m, p) in a["rollouts"].items():
        ids2, m2, p2 = (b0 if key in b0["rollouts"] else b1)["rollouts"][key]
        assert torch.equal(ids, ids2) and torch.equal(m, m2) and torch.equal(p, p2), key
    lengths = torch.cat([m.sum(1) for _, m, _ in a["rollouts"].values()])
    assert lengths.min() < lengths.max(), "the set-up must give completions of different lengths"

    # the same optimiser steps: every rank holds the averaged gradient, equal to one process's
    assert len(a["steps"]) == len(b0["steps"]) == len(b1["steps"]) == 2
    for s1, s2, s3 in zip(a["steps"], b0["steps"], b1["steps"]):
        assert s1["grads"].keys() == s2["grads"].keys() == s3["grads"].keys()
        for n, g in s1["grads"].items():
            assert torch.equal(s2["grads"][n], s3["grads"][n]), n
            torch.testing.assert_close(s2["grads"][n], g, rtol=1e-6, atol=1e-7 * float(g.abs().max()))
        assert torch.equal(s2["lam_grad"], s3["lam_grad"])
        torch.testing.assert_close(s2["lam_grad"], s1["lam_grad"], rtol=1e-6, atol=1e-9)
        assert s1["lam_grad"] != 0
    for n, p in a["params"].items():
        assert torch.equal(b0["params"][n], b1["params"][n]), n
        torch.testing.assert_close(b0["params"][n], p, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(b0["lam"], a["lam"], rtol=1e-6, atol=1e-9)
    assert b0["lam"] == b1["lam"] and a["lam"] != 0

    # rank 0 logs the metrics of the whole batch, once
    ra, rb = _train_rows(one), _train_rows(two)
    assert len(ra) == len(rb) == 1
    for key, v in ra[0].items():
        if key in TIMING or v is None:
            continue
        assert rb[0][key] == pytest.approx(v, rel=1e-6, abs=1e-8), key
    for tag in ("before", "after"):
        assert (one / f"eval_{tag}.jsonl").read_text() == (two / f"eval_{tag}.jsonl").read_text()
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert (sb["eval_before"], sb["eval_after"], sb.get("processes")) == (sa["eval_before"], sa["eval_after"], 2)
