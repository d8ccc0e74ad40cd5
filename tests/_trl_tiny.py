"""A tiny offline Llama + byte-level BPE tokenizer for the TRL integration tests, and the TRL run
they compare. Nothing is downloaded: the tokenizer is trained in code, the model is random.

`build_tiny(dir)` writes the model and tokenizer to dir (once; later calls reuse it). The model's
`<eos>` row of lm_head points along the mean final hidden state, so completions end at varied
lengths (about 1-12 tokens) instead of all being cut at max_completion_length: without that,
every aggregation gives the same number and a parity test proves nothing.

`run(kind, loss_type, out_dir, model_dir, **overrides)` trains 3 steps with TRL's own
GRPOTrainer (kind="trl") or ours (kind="ours") and returns the per-step log lines.
Used in-process by tests/test_integration_trl.py and under torchrun by tests/_trl_dist.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

VOCAB = 300
PROMPTS = [f"What is {a} + {b}? The answer is" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1),
                                                              (9, 9), (8, 3), (0, 7), (5, 5), (3, 3), (1, 8),
                                                              (6, 6), (2, 2), (7, 0)]]


def build_tiny(path) -> str:
    path = Path(path)
    if (path / "done").exists():
        return str(path)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    g = torch.Generator().manual_seed(0)
    text = []
    for _ in range(900):
        a, b = torch.randint(0, 50, (2,), generator=g).tolist()
        text.append(f"What is {a} + {b}? The answer is {a + b}.")
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                     padding_side="left")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=hf_tok.pad_token_id, eos_token_id=hf_tok.eos_token_id,
                      bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float()
    # The eos trick: point the <eos> row of lm_head along the mean final hidden state of some text,
    # scaled so that P(eos) is about 0.1 per token.
    with torch.no_grad():
        ids = hf_tok(PROMPTS, return_tensors="pt", padding=True)
        h = model.model(**ids).last_hidden_state[ids["attention_mask"].bool()]
        d = h.mean(0)
        logits = model.lm_head(h)
        eos = hf_tok.eos_token_id
        # solve for a scale s: mean over tokens of softmax with row eos = s * d / |d|^2 ... ~0.1
        lo, hi = 0.0, 50.0
        for _ in range(40):
            s = (lo + hi) / 2
            row = s * d / d.dot(d)
            lg = logits.clone()
            lg[:, eos] = h @ row
            p = torch.softmax(lg, -1)[:, eos].mean()
            lo, hi = (s, hi) if p < 0.1 else (lo, s)
        model.lm_head.weight[eos] = s * d / d.dot(d)
    model.generation_config.eos_token_id = hf_tok.eos_token_id
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    (path / "done").write_text("ok")
    return str(path)


def reward_len(completions, **kw):
    """Reward: prefers completions of about 5 characters (so that advantages vary and clipping happens)."""
    return [-abs(len(c) - 5) / 5.0 for c in completions]


PARITY = dict(max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
              max_completion_length=12, learning_rate=3e-3, num_iterations=2, beta=0.04,
              use_bias_correction_kl=False, logging_steps=1, save_strategy="no", report_to="none",
              use_vllm=False, bf16=False, use_cpu=True, seed=0, disable_tqdm=True, gradient_checkpointing=False)


# The loss types beyond the clip surrogate and TRL's options on top of it (issue 12 point 3), each
# a (loss_type, overrides of PARITY) pair, with TRL's default use_bias_correction_kl=True (KL x ratio):
# cispo with a cap of 1.2 (so that it binds at step 2), sapo with temperatures away from the
# defaults (the mapping is visible), luspo, and grpo with delta = 1.02 > 1 + epsilon_high = 1.01:
# the two-sided clip binds at step 2 there (TRL's loss without delta differs by 6e-3 relative; with
# delta = 1.25 nothing in these runs reaches it, A < 0 ratios stay below).
VARIANTS = {
    "cispo": ("cispo", dict(epsilon_high=1.2, use_bias_correction_kl=True)),
    "sapo": ("sapo", dict(sapo_temperature_pos=1.5, sapo_temperature_neg=2.0, use_bias_correction_kl=True)),
    "luspo": ("luspo", dict(use_bias_correction_kl=True)),
    "grpo-delta": ("grpo", dict(delta=1.02, epsilon_high=0.01, use_bias_correction_kl=True)),
    # the sequence-level ratio (GSPO's, LUSPO's setting) with GSPO-sized clip ranges, and VESPO with
    # its k / lambda off TRL's defaults
    "gspo": ("grpo", dict(importance_sampling_level="sequence", epsilon=3e-3, epsilon_high=4e-3,
                          use_bias_correction_kl=True)),
    "luspo-seq": ("luspo", dict(importance_sampling_level="sequence", epsilon=3e-3, epsilon_high=4e-3,
                                use_bias_correction_kl=True)),
    "vespo": ("vespo", dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.5,
                            use_bias_correction_kl=True)),
}


def run(kind: str, loss_type: str, out_dir, model_dir, resume=None, **overrides):
    """Train with TRL's GRPOTrainer (kind="trl") or LambdaGRPOTrainer (kind="ours"); return
    (log lines of the optimizer steps, trainer)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    cfg = dict(PARITY, loss_type=loss_type, output_dir=str(out_dir))
    cfg.update(overrides)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_dict({"prompt": PROMPTS})
    if kind == "trl":
        from trl import GRPOConfig, GRPOTrainer

        args, cls = GRPOConfig(**cfg), GRPOTrainer
    else:
        from lambda_grpo.integrations.trl import LambdaGRPOConfig, LambdaGRPOTrainer

        args, cls = LambdaGRPOConfig(**cfg), LambdaGRPOTrainer
    trainer = cls(model=model_dir, reward_funcs=reward_len, args=args, train_dataset=data, processing_class=tok)
    trainer.train(resume_from_checkpoint=resume)
    steps = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
    return steps, trainer


def dump(obj, path) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, default=float))


if __name__ == "__main__":  # quick manual check: python -m tests._trl_tiny DIR
    import sys

    d = build_tiny(sys.argv[1] if len(sys.argv) > 1 else os.path.join("/tmp", "lg_tiny"))
    steps, _ = run("trl", "dapo", os.path.join(d, "out"), d)
    for s in steps:
        print(s)
