"""Hugging Face weights in and out (docs/interop.md): megaloom's logits equal transformers' on the same
tiny random models, a round trip HF -> megaloom checkpoint -> HF is bit-exact, the export loads in
transformers without a warning, and bad inputs stop with one line."""

import io
import json
import logging
import shutil

import pytest
import torch

from megaloom.cli import main
from megaloom.config import load_config
from megaloom.errors import ConfigError
from megaloom.interop import export_hf, import_pretrained, load_model
from tests.tiny_pretrained import KINDS, VOCAB, make

TOKENS = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Every kind of tiny model, saved once for the module."""
    root = tmp_path_factory.mktemp("tiny_hf")
    return {kind: make(kind, root / kind) for kind in KINDS}


def hf_logits(directory, tokens=TOKENS):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_transformers(tiny, kind):
    model, tokenizer, cfg = load_model(tiny[kind])
    with torch.no_grad():
        ours = model(TOKENS)
    diff = (ours - hf_logits(tiny[kind])).abs().max().item()
    print(f"parity {kind} (t, p) = (1, 1): max |megaloom - transformers| = {diff:.1e}")  # docs/interop.md, with -s
    assert diff <= 1e-4, f"{kind}: max |megaloom - transformers| = {diff}"
    assert cfg.model.tied == (kind in ("gpt2", "llama-tied"))
    assert cfg.model.qkv_bias == (kind == "qwen2") and cfg.model.seq_len == 64 == cfg.model.max_positions
    assert tokenizer.kind == "pretrained" and tokenizer.chat_template and tokenizer.eos_id is not None


def test_tokenizer_equals_transformers(tiny):
    from transformers import AutoTokenizer

    _, ours, _ = load_model(tiny["llama-gqa"])
    theirs = AutoTokenizer.from_pretrained(tiny["llama-gqa"])
    text = "def main():\n    return the quick fox"
    assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    chat = theirs.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert ours.encode_special(chat) == theirs(chat, add_special_tokens=False).input_ids


def _capture_transformers_log():
    import transformers

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    transformers.logging.set_verbosity_warning()
    transformers.logging.get_logger().addHandler(handler)
    return stream, lambda: transformers.logging.get_logger().removeHandler(handler)


def _load_quietly(directory):
    """transformers' model and tokenizer of `directory`, its loading info and everything it logged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stream, done = _capture_transformers_log()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    finally:
        done()
    return model, tokenizer, info, stream.getvalue()


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bit_exact_and_loads_without_warning(tiny, tmp_path, kind):
    from safetensors.torch import load_file

    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    import_pretrained(tiny[kind], ckpt)
    shard = kind == "llama-gqa"  # one kind written as shards with an index, as above 2 GB
    _, n = export_hf(ckpt, out, max_shard_bytes=50_000 if shard else 2_000_000_000)
    index = out / "model.safetensors.index.json"
    assert index.is_file() == shard
    files = set(json.loads(index.read_text())["weight_map"].values()) if shard else {"model.safetensors"}
    assert len(files) > 1 or not shard
    theirs = {k: v for f in files for k, v in load_file(out / f).items()}
    original = load_file(tiny[kind] / "model.safetensors")
    assert theirs.keys() == original.keys() and len(theirs) == n
    for name, t in original.items():
        assert torch.equal(theirs[name], t), name
    model, tokenizer, info, log = _load_quietly(out)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert "not initialized" not in log and "not used" not in log and "missing" not in log.lower(), log
    with torch.no_grad():
        assert (model(TOKENS).logits - hf_logits(tiny[kind])).abs().max() == 0
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id


def test_a_missing_weight_is_what_the_warning_check_sees(tiny, tmp_path):
    """The no-warning check above can fail: an export without one tensor is reported by transformers."""
    from safetensors.torch import load_file, save_file

    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    import_pretrained(tiny["llama-gqa"], ckpt)
    export_hf(ckpt, out)
    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    _, _, info, _ = _load_quietly(out)
    assert info["missing_keys"] == {"model.layers.0.mlp.up_proj.weight"} or \
        list(info["missing_keys"]) == ["model.layers.0.mlp.up_proj.weight"]


def test_a_user_key_that_disagrees_is_one_line(tiny):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"model.pretrained={str(tiny['llama-gqa'])!r}", "model.heads=8"])
    msg = str(e.value)
    assert "\n" not in msg and "model.heads = 8" in msg and "heads = 4" in msg
    cfg = load_config(None, [f"model.pretrained={str(tiny['llama-gqa'])!r}", "model.heads=4", "model.kv_heads=2",
                             'model.family="llama"', "model.seq_len=32", "model.norm_eps=1e-5"])
    assert cfg.model.seq_len == 32 and cfg.data.tokenizer == "pretrained"  # agreeing keys are fine
    with pytest.raises(ConfigError, match="exceeds model.max_positions"):
        load_config(None, [f"model.pretrained={str(tiny['llama-gqa'])!r}", "model.seq_len=65"])


@pytest.mark.parametrize("change, words", [
    ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}, "is a MixtralForCausalLM model"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling of type 'llama3'"),
    ({"attention_bias": True}, "attention biases"),
])
def test_what_megaloom_cannot_represent_is_one_line(tiny, tmp_path, change, words):
    directory = tmp_path / "model"
    shutil.copytree(tiny["llama-gqa"], directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(change)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as e:
        load_model(directory)
    assert "\n" not in str(e.value) and words in str(e.value)
    assert "LlamaForCausalLM" in str(e.value)  # and what is supported


def test_a_missing_or_misshapen_tensor_is_found_before_loading(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "model"
    shutil.copytree(tiny["qwen2"], directory)
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(ConfigError, match=r"lacks model.layers.1.self_attn.k_proj.bias \(1 missing, 0 unexpected"):
        load_model(directory)
    tensors["model.layers.1.self_attn.k_proj.bias"] = torch.zeros(31)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(ConfigError, match=r"k_proj.bias has shape \(31,\) there but \(32,\)"):
        load_model(directory)


def test_train_from_pretrained_then_export(tiny, tmp_path, capsys):
    """megaloom train with model.pretrained: the corpus is tokenized with the model's tokenizer, training
    starts from its weights (a learning rate of 1e-12 leaves them), and convert --to hf gives them back."""
    from safetensors.torch import load_file

    run, out = tmp_path / "run", tmp_path / "hf"
    sets = [f"model.pretrained={str(tiny['llama-tied'])!r}", "model.seq_len=32", "train.steps=1",
            "train.global_batch=2", "train.micro_batch=2", "train.lr=1e-12", "train.min_lr=1e-12", "train.warmup=0",
            "train.eval_batches=1", "data.max_bytes=60000", "data.val_fraction=0.3", f"data.dir={str(tmp_path / 'c')!r}",
            "log.progress=false", "log.tensorboard=false", "log.plot=false"]
    assert main(["train", "--run-dir", str(run), *[a for s in sets for a in ("--set", s)]]) == 0
    assert "loaded the pretrained weights of" in capsys.readouterr().out
    assert (run / "tokenizer" / "tokenizer_config.json").is_file()
    assert main(["convert", str(run), str(out), "--to", "hf"]) == 0
    theirs, original = load_file(out / "model.safetensors"), load_file(tiny["llama-tied"] / "model.safetensors")
    assert theirs.keys() == original.keys()
    for name, t in original.items():
        torch.testing.assert_close(theirs[name], t, rtol=0, atol=1e-9, msg=name)


def test_a_megaloom_run_exports_to_hf(tiny_corpus, tmp_path):
    """A Llama-style model trained from scratch with megaloom's own BPE: convert --to hf gives transformers
    the same logits and the same tokens."""
    run, out = tmp_path / "run", tmp_path / "hf"
    sets = [f"data.dir={str(tiny_corpus)!r}", "data.vocab_size=512", "data.max_bytes=1000000",
            "data.bpe_train_bytes=500000", "data.val_fraction=0.2", 'model.family="llama"', "train.steps=2",
            "log.progress=false", "log.tensorboard=false", "log.plot=false"]
    assert main(["train", "configs/debug.toml", "--run-dir", str(run), *[a for s in sets for a in ("--set", s)]]) == 0
    assert main(["convert", str(run), str(out), "--to", "hf"]) == 0
    theirs, hf_tok, info, log = _load_quietly(out)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert "not initialized" not in log and "missing" not in log.lower(), log
    model, tokenizer, _ = load_model(run)
    text = "def f(x):\n    return x + 1"
    ids = tokenizer.encode(text)
    assert hf_tok(text, add_special_tokens=False).input_ids == ids and hf_tok.eos_token_id == tokenizer.eos_id
    with torch.no_grad():
        diff = (model(torch.tensor([ids])) - theirs.eval()(torch.tensor([ids])).logits).abs().max().item()
    assert diff <= 1e-4, diff
