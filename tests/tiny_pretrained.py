"""Tiny random `transformers` models of every family megaloom reads, with a tokenizer and a chat
template, saved to a directory: what the interop tests load, export and compare against. Nothing is
downloaded; the same kind and seed give the same files."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 320  # 256 bytes, 3 special tokens and some merges; even, so tp = 2 splits it
# gpt2 (tied), gpt2 with its own head, llama tied (multi-head), llama untied with GQA, qwen2 (q/k/v biases, GQA)
KINDS = ("gpt2", "gpt2-untied", "llama-tied", "llama-gqa", "qwen2")
TEXT = ["def main():\n    return 0\n", "the quick brown fox jumps over the lazy dog. " * 4, "import os, sys\n"] * 20


def tokenizer(directory: Path):  # noqa: ANN201 (transformers' PreTrainedTokenizerFast)
    """A byte-level BPE with eos, im_start and im_end, and a chat template, saved as transformers does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return fast


def make(kind: str, directory: Path, layers: int = 4, seed: int = 0, vocab: int = VOCAB, hidden: int = 64,
         ffn: int = 96) -> Path:
    """Save a tiny random model of `kind` (one of KINDS) and its tokenizer into `directory`; `vocab`
    embedding rows (at least VOCAB: the tokenizer's are the first); `hidden` and (Llama, Qwen2) `ffn` wide."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    ids = {"bos_token_id": 1, "eos_token_id": 2}
    if kind.startswith("gpt2"):
        config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                            tie_word_embeddings=kind == "gpt2", **ids)
        model = GPT2LMHeadModel(config)
    elif kind.startswith("llama"):
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=4 if kind == "llama-tied" else 2,
                             max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5,
                             tie_word_embeddings=kind == "llama-tied", **ids)
        model = LlamaForCausalLM(config)
    elif kind == "qwen2":
        config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=False, **ids)
        model = Qwen2ForCausalLM(config)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; one of {KINDS}")
    with torch.no_grad():  # random biases and norms, so a wrong mapping of them shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    model.save_pretrained(str(directory))
    tokenizer(directory)
    return directory
