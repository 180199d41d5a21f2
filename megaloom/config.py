"""Typed configuration: dataclasses, TOML files, `--set section.key=value` overrides, validation.

Every field has a docstring-like `help` in its metadata; `megaloom train --help-config` prints them.
Bad input raises `ConfigError` with one line naming the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from megaloom.errors import ConfigError
from megaloom.layout import LayoutSpec, check_layout


def _f(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    family: Literal["gpt2", "llama"] = _f(
        "gpt2",
        "gpt2: LayerNorm, GeLU MLP, learned positions, tied embeddings; "
        "llama: RMSNorm, SwiGLU, rotary positions, grouped-query attention, untied head",
    )
    layers: int = _f(4, "number of transformer layers (l)")
    hidden: int = _f(256, "hidden size (h)")
    heads: int = _f(4, "attention heads (a)")
    kv_heads: int = _f(0, "key/value heads for grouped-query attention (llama); 0 = heads")
    ffn_hidden: int = _f(0, "MLP inner width; 0 = 4h (gpt2) or 8h/3 rounded up to 64 (llama)")
    vocab_size: int = _f(4096, "embedding rows (V); must be >= the tokenizer's vocabulary")
    seq_len: int = _f(256, "sequence length (s) used in training and the model's maximum context")
    dropout: float = _f(0.0, "dropout probability on attention output, MLP output and embeddings")
    norm_eps: float = _f(1e-5, "epsilon of LayerNorm / RMSNorm")
    rope_theta: float = _f(10000.0, "rotary base frequency (llama)")
    init_std: float = _f(0.02, "std of the normal initialisation; residual outputs use std/sqrt(2l)")
    head: Literal["auto", "tied", "untied"] = _f(
        "auto", "output projection: tied = the token embedding (GPT-2, SmolLM2), untied = its own head.weight; "
                "auto = tied for gpt2, untied for llama")
    qkv_bias: bool = _f(False, "biases on the q/k/v projections (Qwen2); gpt2 always has them")
    max_positions: int = _f(0, "positions the model supports: rows of gpt2's position table and the cap of "
                               "model.seq_len; 0 = model.seq_len")
    pretrained: str = _f("", "a Hugging Face model directory or a .gguf file: the model.* keys are read from it "
                             "(keys also set here must agree) and its weights are the starting point (docs/interop.md)")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def ffn(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.family == "gpt2":
            return 4 * self.hidden
        return 64 * ((8 * self.hidden // 3 + 63) // 64)

    @property
    def tied(self) -> bool:
        return self.head == "tied" or (self.head == "auto" and self.family == "gpt2")

    @property
    def positions(self) -> int:
        return self.max_positions or self.seq_len


@dataclass
class DataConfig:
    sources: list[str] = _f(["stdlib"], 'text files, directories or .jsonl files; "stdlib" = the Python standard library; '
                                        'SFT: .jsonl or .parquet files of conversations')
    tokenizer: Literal["bpe", "gpt2", "pretrained"] = _f(
        "bpe", "bpe: byte-level BPE trained locally; gpt2: GPT-2's BPE ranks; pretrained: model.pretrained's own "
               "tokenizer (the default when model.pretrained is set)")
    vocab_size: int = _f(4096, "vocabulary size of the locally trained BPE")
    gpt2_ranks: str = _f("", "path to gpt2.tiktoken (tokenizer = gpt2)")
    dir: str = _f("", "prepared corpus directory; empty = a cache directory keyed by the data settings")
    val_fraction: float = _f(0.005, "fraction of documents held out for validation")
    max_bytes: int = _f(0, "stop reading sources after this many bytes of text; 0 = no limit")
    bpe_train_bytes: int = _f(8_000_000, "bytes of training text used to train the BPE")
    format: Literal["auto", "chat", "prompt_response"] = _f(
        "auto", "SFT records (train.objective = \"sft\"): chat = {\"messages\": [{\"role\", \"content\"}, ...]}, "
                "prompt_response = {\"prompt\", \"response\"}; auto = recognised from each record's fields")
    chat_template: str = _f("", "SFT: a Jinja chat template file to render conversations with; empty = the "
                                "tokenizer's own (a pretrained model's), else megaloom's default")
    train_on_prompt: bool = _f(False, "SFT: the loss counts every token, not only the assistant's")
    packing: bool = _f(False, "SFT: several conversations per sequence, positions restarting and attention kept "
                              "inside each one")


@dataclass
class TrainConfig:
    steps: int = _f(200, "optimizer steps")
    objective: Literal["lm", "sft"] = _f(
        "lm", "lm: next-token prediction on every token of data.sources (pretraining); sft: supervised fine-tuning "
              "on conversations (JSONL or Parquet), the loss on the assistant's tokens only (docs/finetune.md)")
    global_batch: int = _f(16, "sequences per optimizer step, across all data-parallel ranks")
    micro_batch: int = _f(16, "sequences per forward/backward pass; global_batch / (micro_batch*dp) = accumulation steps")
    lr: float = _f(1e-3, "peak learning rate")
    min_lr: float = _f(1e-4, "learning rate at the end of the cosine decay")
    warmup: int = _f(20, "linear warm-up steps")
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices only; not norms, biases)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 = off")
    seed: int = _f(1234, "seed of initialisation, data order and dropout")
    precision: Literal["fp32", "bf16", "fp16"] = _f(
        "fp32", "fp32 | bf16 (autocast) | fp16 (autocast + dynamic loss scaling)")
    eval_every: int = _f(100, "steps between validation runs; 0 = only at the end")
    eval_batches: int = _f(8, "micro-batches per validation run")
    eval_tasks: list[str] = _f([], "evaluations run with each validation (every train.eval_every steps): each item is "
                                   "megaloom eval's task flags, e.g. \"--task perplexity --data val.txt\" or "
                                   "\"--task choice --data arc.jsonl --fewshot 5\"; results go to metrics.jsonl as "
                                   "eval/NAME/METRIC (docs/eval.md)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    compile: bool = _f(False, "torch.compile the model")
    recompute: Literal["none", "selective", "full"] = _f(
        "none", "activation recomputation: none | selective (attention core only) | full (whole layer)")
    max_consecutive_skips: int = _f(
        20, "stop the run after this many consecutive steps skipped for non-finite loss or gradients")
    samples: int = _f(0, "text samples to generate and print at the end of training")
    sample_tokens: int = _f(64, "tokens per end-of-training sample")
    sample_prompts: list[str] = _f(["def ", "class ", "import "], "prompts of the end-of-training samples, used in turn")


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (docs/finetune.md): the base model frozen, only the method's own
    parameters trained, saved and exported (as PEFT adapters)."""

    method: Literal["none", "lora", "dora", "adapter", "prefix", "prompt", "ia3"] = _f(
        "none", "none = full training; lora | dora (weight-decomposed LoRA) | adapter (Houlsby bottleneck after "
                "attention and MLP) | prefix (prefix tuning: learned keys/values per layer) | prompt (soft prompt "
                "tuning) | ia3 (learned rescaling of keys, values and the MLP)")
    rank: int = _f(8, "LoRA/DoRA rank r")
    alpha: float = _f(16.0, "LoRA/DoRA scaling numerator: the update is (alpha / rank) B A (alpha / sqrt(rank) with rslora)")
    dropout: float = _f(0.0, "dropout on the LoRA/DoRA input")
    rslora: bool = _f(False, "rank-stabilised LoRA scaling alpha / sqrt(rank) (Kalajdzievski 2023)")
    targets: list[str] = _f([], "Hugging Face module names the method adapts: q_proj k_proj v_proj o_proj gate_proj "
                                "up_proj down_proj (llama), c_attn c_proj c_fc (gpt2; c_proj = both attention's and the "
                                "MLP's, as PEFT matches it); empty = PEFT's default for the family and method")
    bottleneck: int = _f(64, "adapter: the bottleneck width of the Houlsby adapters")
    virtual_tokens: int = _f(20, "prefix and prompt tuning: number of virtual tokens")
    prompt_init_text: str = _f("", "prompt tuning: initialise the virtual tokens from the embeddings of this text "
                                   "(PEFT's TEXT init); empty = random")
    init: str = _f("", "a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) to start from; "
                       "its method and keys override the ones here")
    quantize_base: Literal["none", "nf4"] = _f(
        "none", "nf4 = QLoRA: the frozen base linears held in 4-bit NormalFloat (torchao); adapters stay in "
                "the training precision")


@dataclass
class ParallelConfig:
    tp: int = _f(1, "tensor-parallel size")
    pp: int = _f(1, "pipeline-parallel size")
    dp: int = _f(1, "data-parallel size")
    schedule: Literal["gpipe", "1f1b", "interleaved", "zb-h1"] = _f("1f1b", "pipeline schedule")
    chunks: int = _f(1, "model chunks per pipeline rank (interleaved schedule)")
    zero: int = _f(0, "ZeRO stage over dp: 0 none, 1 optimizer state, 2 + gradients, 3 + parameters (FSDP2)")
    layers_per_stage: list[int] = _f([], "layers of each pipeline stage (pp x chunks entries); empty = an even split")
    sequence_parallel: bool = _f(False, "shard norms and dropout along the sequence over the tp ranks (Korthikanti et al.)")
    grad_reduce_dtype: Literal["fp32", "bf16"] = _f("fp32", "dtype of the data-parallel gradient all-reduce")
    powersgd_rank: int = _f(0, "PowerSGD rank for the data-parallel gradient all-reduce (zero 0/1); 0 = off")
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "torch.distributed backend: auto = nccl on GPUs, gloo on CPUs")
    strict_p2p: bool = _f(False, "wait for every pipeline p2p batch before the next compute, so CPU/gloo tests run the "
                                 "runtime under NCCL's blocking rule")
    timeout_s: float = _f(600.0, "seconds a collective or p2p transfer may wait for a peer before the run stops "
                                 "with an error naming the operation")


@dataclass
class CheckpointConfig:
    every: int = _f(0, "steps between checkpoints; 0 = only at the end")
    keep: int = _f(2, "checkpoints to keep (the newest ones)")
    async_: bool = _f(False, "write checkpoints in a background thread; the step only waits for the copy to CPU memory")
    load: str = _f("", "a checkpoint or run directory to start from, saved in any layout; a run directory that "
                       "already has a checkpoint resumes from its own instead")


@dataclass
class FaultsConfig:
    """Fault injection for tests and drills: the fault fires once per run directory."""

    kill_rank: int = _f(-1, "this rank kills itself (SIGKILL) in the middle of step faults.at_step; -1 = never")
    hang_rank: int = _f(-1, "this rank stops responding in the middle of step faults.at_step; -1 = never")
    at_step: int = _f(0, "the step (1-based) in which a kill, hang or non-finite fault fires")
    nonfinite_steps: int = _f(0, "make the gradients non-finite for this many steps from faults.at_step on")


@dataclass
class LogConfig:
    every: int = _f(10, "steps between metrics.jsonl rows")
    progress: bool = _f(True, "live progress bar on the terminal")
    tensorboard: bool = _f(True, "write TensorBoard event files in the run directory")
    plot: bool = _f(True, "write loss.png in the run directory at the end")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def _attr(key: str) -> str:
    """The dataclass field of a config key: a Python keyword (checkpoint.async) gets a trailing _."""
    return key + "_" if keyword.iskeyword(key) else key


def _key(attr: str) -> str:
    return attr[:-1] if attr.endswith("_") and keyword.iskeyword(attr[:-1]) else attr


def keys_of(typ: type) -> dict[str, Any]:
    """The config keys of a section and their types."""
    return {_key(name): t for name, t in typing.get_type_hints(typ).items()}


# ---------------------------------------------------------------- loading and overrides


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file, then `section.key=value` overrides, then validation."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_toml(path)
    cfg = Config()
    given: set[str] = set()  # the keys the user set: they must agree with model.pretrained
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{section!r}: expected a [{section}] table, got {values!r}; "
                              f"write it as [{section}] with keys below")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)
            given.add(f"{section}.{key}")
    for item in overrides or []:
        key, value = parse_override(item)
        set_value(cfg, key, value)
        given.add(key)
    if cfg.model.pretrained:
        apply_pretrained(cfg, given)
    validate(cfg)
    return cfg


def apply_pretrained(cfg: Config, given: set[str]) -> None:
    """model.pretrained: the model.* keys come from the model's own files (megaloom/interop/hparams.py);
    a key the user also set must agree. model.seq_len defaults to the model's context, data.tokenizer to
    the model's tokenizer."""
    from megaloom.interop.hparams import pretrained_model_keys

    m = cfg.model
    for key, value in pretrained_model_keys(m.pretrained).items():
        mine = getattr(m, key)
        if f"model.{key}" in given and not _agrees(m, key, mine, value):
            raise ConfigError(f"model.{key} = {_toml_value(mine)} but model.pretrained = '{m.pretrained}' has "
                              f"{key} = {_toml_value(value)}; remove model.{key} or set it to {_toml_value(value)}")
        setattr(m, key, value)
    if "model.seq_len" not in given:
        m.seq_len = m.max_positions
    if "data.tokenizer" not in given:
        cfg.data.tokenizer = "pretrained"


def _agrees(m: ModelConfig, key: str, mine: Any, theirs: Any) -> bool:
    """Whether a user's value means the pretrained one: 0 kv_heads = heads, 0 ffn_hidden and "auto" head
    = the family's default, floats equal to float32 precision (GGUF stores them in float32)."""
    if isinstance(theirs, float):
        return abs(mine - theirs) <= 1e-6 * max(abs(theirs), 1e-30)
    if key == "kv_heads":
        return (mine or m.heads) == (theirs or m.heads)
    if key == "ffn_hidden" and mine == 0:
        return dataclasses.replace(m, ffn_hidden=0).ffn == theirs
    if key == "head" and mine == "auto":
        return dataclasses.replace(m, head="auto").tied == (theirs == "tied")
    return mine == theirs


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass a TOML file such as configs/debug.toml")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{path}' is not valid TOML: {e}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """`section.key=value`; the value is read as a TOML value, else taken as a plain string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.steps=50")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, value


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r} in {dotted!r}{_suggest(section, SECTIONS)}")
    sub = getattr(cfg, section)
    hints = keys_of(type(sub))
    if key not in hints:
        raise ConfigError(f"unknown config key {dotted!r}{_suggest(key, hints, prefix=section + '.')}")
    setattr(sub, _attr(key), coerce(dotted, value, hints[key]))


def _suggest(name: str, options: Any, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    valid = ", ".join(prefix + o for o in options)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys: {valid}"


def coerce(key: str, value: Any, typ: Any) -> Any:
    """Check `value` against the field type; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not one of {' | '.join(map(str, choices))}; pick one of those")
        return value
    if origin in (list,):
        (item_type,) = typing.get_args(typ)
        if isinstance(value, str):  # `--set data.sources=path` means a one-element list
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r} should be a list of {item_type.__name__}, e.g. {key}=[...]")
        return [coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config type {typ}")  # not used by any field
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r} should be true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r} should be a whole number")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} = {value!r} should be a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} = {value!r} should be a string, e.g. {key}=\"...\"")
    raise TypeError(f"unsupported config type {typ}")


# ---------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Check ranges and contradictions; one line per problem, first problem wins."""
    m, t, p, d = cfg.model, cfg.train, cfg.parallel, cfg.data
    _positive(cfg, "model.layers", "model.hidden", "model.heads", "model.vocab_size", "model.seq_len")
    _positive(cfg, "train.steps", "train.global_batch", "train.micro_batch", "train.eval_batches",
              "train.sample_tokens", "parallel.tp", "parallel.pp", "parallel.dp", "parallel.chunks",
              "data.vocab_size", "log.every", "checkpoint.keep", "train.max_consecutive_skips",
              "parallel.timeout_s")
    _non_negative(cfg, "model.kv_heads", "model.ffn_hidden", "model.max_positions", "train.warmup", "train.eval_every",
                  "train.samples", "train.grad_clip", "train.weight_decay", "train.min_lr",
                  "checkpoint.every", "data.max_bytes", "data.bpe_train_bytes", "faults.at_step",
                  "faults.nonfinite_steps")
    for key, cap in (("parallel.tp", 2**20), ("parallel.pp", 2**20), ("parallel.dp", 2**20), ("parallel.chunks", 1024)):
        if get_value(cfg, key) > cap:
            raise ConfigError(f"{key} = {get_value(cfg, key)} is larger than megaloom supports ({cap}); "
                              "use a realistic size")
    if m.hidden % m.heads:
        raise ConfigError(f"model.hidden ({m.hidden}) must be a multiple of model.heads ({m.heads}); "
                          f"try model.heads={_divisor_near(m.hidden, m.heads)}")
    if m.kv_heads and m.family == "gpt2" and m.kv_heads != m.heads:
        raise ConfigError(f"model.kv_heads = {m.kv_heads}: grouped-query attention needs model.family=\"llama\"; "
                          "set model.kv_heads=0 for gpt2")
    if m.heads % m.n_kv_heads:
        raise ConfigError(f"model.heads ({m.heads}) must be a multiple of model.kv_heads ({m.kv_heads}); "
                          f"try model.kv_heads={_divisor_near(m.heads, m.n_kv_heads)}")
    if m.family == "llama" and m.head_dim % 2:
        raise ConfigError(f"rotary embeddings need an even head size, got hidden/heads = {m.head_dim}; change model.heads")
    if m.max_positions and m.seq_len > m.max_positions:
        raise ConfigError(f"model.seq_len ({m.seq_len}) exceeds model.max_positions ({m.max_positions}), the "
                          f"longest context the model supports; set model.seq_len={m.max_positions} or less")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout = {m.dropout} must be in [0, 1)")
    if not 0.0 < t.lr < 1.0:
        raise ConfigError(f"train.lr = {t.lr} must be in (0, 1); typical values are 1e-4 .. 3e-3")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr ({t.min_lr}) must not exceed train.lr ({t.lr})")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction = {d.val_fraction} must be in [0, 1)")
    if d.tokenizer == "bpe" and d.vocab_size > m.vocab_size:
        raise ConfigError(f"data.vocab_size ({d.vocab_size}) exceeds model.vocab_size ({m.vocab_size}); "
                          f"set model.vocab_size={d.vocab_size} or larger")
    if d.tokenizer == "gpt2" and m.vocab_size < 50257:
        raise ConfigError(f"data.tokenizer = \"gpt2\" has 50257 tokens but model.vocab_size = {m.vocab_size}; "
                          "set model.vocab_size=50304")
    if t.samples and not t.sample_prompts:
        raise ConfigError("train.sample_prompts is empty while train.samples > 0; give a prompt, e.g. [\"def \"]")
    if not d.sources:
        raise ConfigError("data.sources is empty; give at least one source, e.g. [\"stdlib\"]")
    _check_objective(cfg)
    if p.powersgd_rank < 0 or (p.powersgd_rank and p.zero >= 2):
        raise ConfigError(f"parallel.powersgd_rank = {p.powersgd_rank} needs parallel.zero 0 or 1 (got {p.zero}) "
                          "and must not be negative; FSDP's reduce-scatter (ZeRO-2/3) is not compressed")
    check_layout(m, layout_spec(cfg))  # the same check as `megaloom simulate` and `megaloom plan`
    world = p.tp * p.pp * p.dp
    for key in ("faults.kill_rank", "faults.hang_rank"):
        rank = get_value(cfg, key)
        if rank >= world or rank < -1:
            raise ConfigError(f"{key} = {rank} is not a rank of this run (0..{world - 1}); use -1 to turn it off")
        if rank >= 0 and cfg.faults.at_step == 0:
            raise ConfigError(f"{key} = {rank} needs faults.at_step, the step in which it fires, e.g. faults.at_step=7")
    if cfg.faults.nonfinite_steps and cfg.faults.at_step == 0:
        raise ConfigError("faults.nonfinite_steps needs faults.at_step, the first step it poisons, e.g. faults.at_step=3")
    dev = t.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"train.device = {dev!r} is not auto, cpu, cuda or cuda:N")


def _check_objective(cfg: Config) -> None:
    """The SFT keys need train.objective = "sft", and SFT needs conversation files."""
    d = cfg.data
    if cfg.train.objective == "lm":
        sft_only = {"data.packing": d.packing, "data.train_on_prompt": d.train_on_prompt,
                    "data.format": d.format != "auto", "data.chat_template": d.chat_template}
        for key, value in sft_only.items():
            if value:
                raise ConfigError(f"{key} = {_toml_value(get_value(cfg, key))} applies to supervised fine-tuning "
                                  "only; set train.objective=\"sft\" or remove it")
    elif "stdlib" in d.sources:
        raise ConfigError("train.objective = \"sft\" reads conversations, but data.sources has \"stdlib\"; give "
                          ".jsonl or .parquet files, e.g. from tools/build_instruct.py")


def layout_spec(cfg: Config) -> LayoutSpec:
    """The config's layout, as `megaloom.layout` and the planner state it."""
    p, t = cfg.parallel, cfg.train
    return LayoutSpec(tp=p.tp, pp=p.pp, dp=p.dp, chunks=p.chunks, microbatch=t.micro_batch, global_batch=t.global_batch,
                      zero=p.zero, schedule=p.schedule, sequence_parallel=p.sequence_parallel,
                      layers_per_stage=tuple(p.layers_per_stage))


def _positive(cfg: Config, *keys: str) -> None:
    for k in keys:
        v = get_value(cfg, k)
        if v <= 0:
            raise ConfigError(f"{k} = {v} must be positive")


def _non_negative(cfg: Config, *keys: str) -> None:
    for k in keys:
        v = get_value(cfg, k)
        if v < 0:
            raise ConfigError(f"{k} = {v} must not be negative")


def _divisor_near(n: int, want: int) -> int:
    """The divisor of n closest to `want` (the smaller on a tie), looking at most 10,000 steps away:
    the values are user input and may be huge."""
    for step in range(10_000):
        for x in (want - step, want + step):
            if 1 <= x <= n and n % x == 0:
                return x
    return 1


def get_value(cfg: Config, dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    return getattr(getattr(cfg, section), _attr(key))


# ---------------------------------------------------------------- output


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return {section: {_key(k): v for k, v in values.items()} for section, values in dataclasses.asdict(cfg).items()}


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (written into every run directory)."""
    lines: list[str] = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def describe() -> str:
    """Every key with its type, default and help, for `--help-config` and the docs."""
    out = []
    for section, typ in SECTIONS.items():
        out.append(f"[{section}]")
        hints = typing.get_type_hints(typ)
        for f in dataclasses.fields(typ):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            typ_ = hints[f.name]
            if typing.get_origin(typ_) is Literal:
                tname = " | ".join(typing.get_args(typ_))
            else:
                tname = getattr(typ_, "__name__", str(typ_))
            out.append(f"  {section}.{_key(f.name)} ({tname}, default {_toml_value(default)}): {f.metadata['help']}")
    return "\n".join(out)
