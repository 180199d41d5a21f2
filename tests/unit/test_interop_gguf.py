"""SmolLM2-135M-Instruct from its GGUF file (Q4_1, dequantised with the `gguf` package): the model
continues a prompt as expected. Under --runslow: it computes what transformers' Llama computes on the
same weights, and its logits equal those of transformers' own GGUF load (which takes ~20 s)."""

import pytest
import torch

from megaloom.interop import load_model
from megaloom.interop.export import hf_config, hf_state
from tests.smollm2 import PROMPT, gguf_path, transformers_gguf_logits


@pytest.fixture(scope="module")
def smollm2():
    return load_model(gguf_path())


def test_smollm2_gguf_loads_and_continues_a_prompt(smollm2):
    model, tokenizer, cfg = smollm2
    m = cfg.model
    assert (m.family, m.layers, m.hidden, m.heads, m.kv_heads, m.tied, m.max_positions) == \
        ("llama", 30, 576, 9, 3, True, 8192)
    assert tokenizer.chat_template.startswith("{% for message in messages %}") and tokenizer.eos_id == 2
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        ours = model(ids)
    assert tokenizer.decode([int(ours[0, -1].argmax())]) == " Berlin"  # q/k rows un-permuted right


@pytest.mark.slow
def test_smollm2_logits_equal_transformers_llama_on_the_same_weights(smollm2):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, tokenizer, cfg = smollm2
    m = cfg.model
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        ours = model(ids)
    config = {k: v for k, v in hf_config(m, tokenizer, torch.float32).items() if k not in ("architectures", "dtype")}
    reference = LlamaForCausalLM(LlamaConfig(**config)).eval()
    missing, unexpected = reference.load_state_dict(hf_state(m, model.state_dict()), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: the head is the embedding
    reference.tie_weights()
    with torch.no_grad():
        diff = (ours - reference(ids).logits).abs().max().item()
    print(f"parity SmolLM2 (1, 1): max |megaloom - transformers' Llama on the same weights| = {diff:.1e}")
    assert diff <= 1e-4, diff


@pytest.mark.slow
def test_smollm2_gguf_logits_equal_transformers_gguf_load(smollm2):
    from transformers import AutoTokenizer

    model, tokenizer, _ = smollm2
    path = gguf_path()
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = PROMPT + " Hello, world!\n  def f(x): return x ** 2"
    assert tokenizer.encode(text) == theirs(text, add_special_tokens=False).input_ids
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        diff = (model(ids) - transformers_gguf_logits(path, ids)).abs().max().item()
    print(f"parity SmolLM2 GGUF (t, p) = (1, 1): max |megaloom - transformers' GGUF load| = {diff:.1e}")
    assert diff <= 1e-4, diff


@pytest.mark.slow
def test_smollm2_gguf_to_checkpoint_to_hf(smollm2, tmp_path):
    """convert model.gguf CKPT, then convert CKPT OUT --to hf: transformers loads OUT without a warning
    about weights, its tokenizer applies the chat template, and its logits are megaloom's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megaloom.cli import main

    model, tokenizer, _ = smollm2
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    assert main(["convert", str(gguf_path()), str(ckpt)]) == 0
    assert main(["convert", str(ckpt), str(out), "--to", "hf"]) == 0
    theirs, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf_tok = AutoTokenizer.from_pretrained(out)
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.encode_special(chat) == hf_tok(chat, add_special_tokens=False).input_ids
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        diff = (model(ids) - theirs.eval()(ids).logits).abs().max().item()
    print(f"parity SmolLM2 exported to HF: max |megaloom - transformers| = {diff:.1e}")
    assert diff <= 1e-4, diff
