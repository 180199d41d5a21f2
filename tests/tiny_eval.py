"""Tiny random Hugging Face models for the evaluation tests, with their own tokenizers, and small local task
files: what the evaluation tests give both megaloom and lm-evaluation-harness. Nothing is downloaded.

- gpt2: GPT2LMHeadModel (tied head), a byte-level BPE whose bos = eos = <|endoftext|>, nothing added
  to an encoding.
- llama: LlamaForCausalLM (grouped-query attention, untied head), a tokenizer that adds <s> to every
  encoding (as Llama's do) and a ChatML chat template.

Weights use initializer_range 0.2 rather than 0.02, so that choices get clearly different scores and
no accuracy comparison hangs on a near-tie.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
WORDS = "def class import return yield lambda print open while for the a of".split()


def corpus_text() -> str:
    return Path(json.__file__).with_name("decoder.py").read_text(encoding="utf-8")


def _tokenizer(family: str):  # noqa: ANN202
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>"] if family == "gpt2" else ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus_text()], trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if family == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>")
    out.chat_template = CHATML
    return out


def make_tiny_hf(out: Path, family: str, seed: int = 0, positions: int = 64, extra_rows: int = 0) -> Path:
    """A random `family` ("gpt2" or "llama") model and its tokenizer, saved with save_pretrained; the
    model has `extra_rows` embedding rows more than the tokenizer has tokens (an odd vocabulary with 1)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = _tokenizer(family)
    ids = {"vocab_size": len(tok) + extra_rows, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=positions,
                                           initializer_range=0.2, **ids))
    else:
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64,
                                             max_position_embeddings=positions, initializer_range=0.2,
                                             tie_word_embeddings=False, **ids))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_task_files(directory: Path, n_choice: int = 24, seed: int = 0) -> dict[str, Path]:
    """A perplexity file (.jsonl, a "text" per document: code, prose with non-ASCII and trailing newlines,
    a one-liner) and a choice file (contexts ending in nothing, a space, a newline or a colon, 2-4
    choices), plus the same data as lm-evaluation-harness task YAMLs that read them."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    docs = [corpus_text()[:2500], "Naïve café prose — with ünïcode,\n\n  spaces and a trailing newline.\n" * 4,
            "short doc\n"]
    ppl = directory / "ppl.jsonl"
    ppl.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    choice = directory / "choice.jsonl"
    lines = []
    for _ in range(n_choice):
        ctx = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 9))) + rng.choice(["", " ", "\n", ":"])
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(2, 5))]
        lines.append(json.dumps({"context": ctx, "choices": choices, "answer": rng.randrange(len(choices))}) + "\n")
    choice.write_text("".join(lines), encoding="utf-8")
    tasks = directory / "tasks"
    tasks.mkdir(exist_ok=True)
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (tasks / "ml_ppl.yaml").write_text(
        "task: ml_ppl\n" + common.format(ppl) + "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
        "doc_to_target: text\nmetric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n")
    (tasks / "ml_choice.yaml").write_text(
        "task: ml_choice\n" + common.format(choice) + "fewshot_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n"
        "  - metric: acc_norm\n")
    return {"ppl": ppl, "choice": choice, "tasks": tasks}
