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
    format: Literal["auto", "chat", "prompt_response", "preference", "prompt"] = _f(
        "auto", "records of SFT and DPO (train.objective = \"sft\" | \"dpo\"): chat = {\"messages\": [{\"role\", "
                "\"content\"}, ...]}, prompt_response = {\"prompt\", \"response\"}, preference = {\"prompt\", \"chosen\", "
                "\"rejected\"} (strings or chat messages), prompt = {\"prompt\", <fields the reward reads>} (GRPO); auto = "
                "recognised from each record's fields")
    chat_template: str = _f("", "SFT: a Jinja chat template file to render conversations with; empty = the "
                                "tokenizer's own (a pretrained model's), else megaloom's default")
    train_on_prompt: bool = _f(False, "SFT: the loss counts every token, not only the assistant's")
    packing: bool = _f(False, "SFT: several conversations per sequence, positions restarting and attention kept "
                              "inside each one")


@dataclass
class TrainConfig:
    steps: int = _f(200, "optimizer steps")
    objective: Literal["lm", "sft", "dpo", "reward", "grpo", "ppo", "distill"] = _f(
        "lm", "lm: next-token prediction on every token of data.sources (pretraining); sft: supervised fine-tuning "
              "on conversations (JSONL or Parquet), the loss on the assistant's tokens only (docs/finetuning.md); "
              "dpo: direct preference optimisation on {prompt, chosen, rejected} pairs, [dpo]; reward: a reward model "
              "(a scalar head) on the same pairs, [reward]; grpo: group relative policy optimisation on prompts with a "
              "verifiable reward, [rl]; ppo: PPO with a value head, a KL penalty and a reward function or reward model, "
              "[rl] (docs/alignment.md); distill: knowledge distillation from a frozen teacher, "
              "[distill] (docs/compression.md)")
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
    keep_sparsity: bool = _f(False, "keep pruned weights at zero: the masks of the loaded checkpoint (megaloom prune "
                                    "writes them), else its zeros, applied after every optimizer step and saved "
                                    "with the checkpoints (docs/compression.md)")


# peft.method values whose adapters can be switched off for one forward (megaloom/tune/peft.py adapters_off):
# prefix and prompt tuning change the sequence the model sees and have no switch
SWITCHABLE_PEFT = ("lora", "dora", "ia3", "adapter")


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (docs/finetuning.md): the base model frozen, only the method's own
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
    reference: Literal["auto", "adapters_off", "copy"] = _f(
        "auto", "the reference of DPO, GRPO (rl.beta > 0) and PPO (rl.kl_coef > 0) under PEFT: adapters_off = the "
                "trained model with its adapters switched off for the reference's forward (no second model; TRL's "
                "disable_adapter), copy = a frozen copy of the base; auto = adapters_off for lora, dora, ia3 and "
                "adapter, copy for prefix and prompt")


@dataclass
class DPOConfig:
    """Direct preference optimisation and its relatives (train.objective = "dpo"; docs/alignment.md)."""

    loss: Literal["sigmoid", "ipo", "hinge", "simpo"] = _f(
        "sigmoid", "sigmoid: DPO (Rafailov et al. 2023); ipo: IPO (Azar et al. 2023); hinge: SLiC/RSO's hinge; "
                   "simpo: SimPO (Meng et al. 2024), length-normalised and without a reference")
    beta: float = _f(0.1, "the KL strength beta (IPO's tau)")
    label_smoothing: float = _f(0.0, "cDPO's label noise epsilon in [0, 0.5) (sigmoid and simpo)")
    simpo_gamma: float = _f(0.5, "SimPO's target reward margin gamma")
    precompute_reference: bool = _f(
        False, "compute the reference's log-probabilities of every pair once, before the first step, and store "
               "them in the run directory: no reference model is held while training")


@dataclass
class RewardConfig:
    """Reward models (train.objective = "reward"; docs/alignment.md)."""

    center_coefficient: float = _f(0.0, "weight c of the centring term c*mean((r_chosen + r_rejected)^2) that pulls "
                                        "the rewards' mean to 0 (TRL's center_rewards_coefficient; Eisenstein et al. "
                                        "2023); 0 = off")


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher (train.objective = "distill"; docs/compression.md)."""

    teacher: str = _f("", "the teacher: any MODEL megaloom loads (run directory, checkpoint, Hugging Face directory, "
                          ".gguf), with the student's tokenizer and vocabulary")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = _f(
        "forward_kl", "forward_kl: KL(teacher || student); reverse_kl: KL(student || teacher); jsd: the generalised "
                      "Jensen-Shannon divergence with distill.beta (TRL's GKD, Agarwal et al. 2024 eq. 1)")
    beta: float = _f(0.5, "jsd: the mixture weight beta in (0, 1) of the teacher, m = beta*teacher + (1-beta)*student")
    temperature: float = _f(1.0, "both models' logits are divided by it before the divergence (as TRL's GKD)")
    alpha: float = _f(0.5, "weight of the cross entropy on the data's targets; the divergence gets 1 - alpha "
                           "(torchtune's knowledge-distillation recipes: alpha = 1 - kd_ratio)")
    data: Literal["text", "conversations"] = _f(
        "text", "text: data.sources read as for train.objective = \"lm\"; conversations: as for \"sft\"")
    init_from_teacher_layers: list[int] = _f(
        [], "the student (model.*, model.layers of these) starts from these teacher layers plus the teacher's "
            "embedding, final norm and head; empty = its own initialisation")


@dataclass
class QATConfig:
    """Quantization-aware training (docs/compression.md): the block linears fake-quantized in every training
    forward (torchao's QAT), then `megaloom quantize RUN OUT --from-qat` makes the quantized model."""

    scheme: Literal["none", "int8-dynamic-act-int4-weight", "int8-weight", "int4-weight"] = _f(
        "none", "none = off; int4-weight: int4 weights, one scale per group; int8-weight: int8 weights, one scale "
                "per output row (or group); int8-dynamic-act-int4-weight: int4 weights and int8 activations, "
                "asymmetric per token (the names and torchao configs of megaloom quantize --method)")
    group_size: int = _f(0, "input features per scale; 0 = the scheme's default: 32 for the int4 schemes, one scale "
                            "per output row for int8-weight. Must divide every block linear's input features, and "
                            "each tp rank's share of the row-parallel ones (attention output, down projection)")


@dataclass
class RLConfig:
    """Reinforcement learning with rollouts (train.objective = "grpo"; docs/alignment.md)."""

    reward: str = _f("exact_match", "the reward of a completion: exact_match (the completion, stripped, equals the "
                                    "record's rl.answer_field), last_number (the last integer in the completion equals "
                                    "it), \"module:function\", called as function(completion: str, record: dict) -> "
                                    "float, or (PPO) a reward model's run directory")
    answer_field: str = _f("answer", "the record field exact_match compares with")
    group_size: int = _f(4, "completions sampled per prompt (GRPO's group G); train.global_batch counts prompts")
    max_new_tokens: int = _f(32, "longest completion; prompt + completion must fit model.seq_len")
    temperature: float = _f(1.0, "sampling temperature of the rollouts (validation is greedy)")
    top_p: float = _f(1.0, "nucleus sampling of the rollouts")
    beta: float = _f(0.0, "weight of the k3 KL to the reference (the starting weights); 0 = no reference model")
    clip: float = _f(0.2, "clipping epsilon of the surrogate")
    scale_rewards: Literal["group", "batch", "none"] = _f(
        "group", "advantage normalisation: group std (GRPO), batch std, none (Dr. GRPO)")
    aggregation: Literal["sequence", "token"] = _f(
        "sequence", "GRPO: sequence = each completion's mean over its tokens, then the mean (DeepSeekMath eq. 3); "
                    "token = the mean over all completion tokens of the micro-batch")
    ppo_epochs: int = _f(2, "PPO: passes over each rollout batch")
    rollout_batch: int = _f(0, "PPO: prompts per rollout (per optimizer step train.global_batch of them are used); "
                               "0 = train.global_batch")
    kl_coef: float = _f(0.05, "PPO: initial coefficient of the per-token KL penalty in the reward")
    kl_target: float = _f(0.0, "PPO: the adaptive controller's KL target (Ziegler et al. 2019); 0 = a fixed kl_coef")
    kl_horizon: int = _f(10000, "PPO: the adaptive controller's horizon, in rollout samples")
    gamma: float = _f(1.0, "PPO: discount of GAE")
    lam: float = _f(0.95, "PPO: lambda of GAE")
    critic: Literal["shared", "separate"] = _f(
        "shared", "PPO: shared = a value head on the policy's trunk (one model, one optimizer); separate = a second "
                  "model from the same start weights with its own value head and optimizer, trained by the value "
                  "loss alone")
    vf_coef: float = _f(0.1, "PPO: weight of the value loss in the policy's loss (rl.critic = \"shared\"; a separate "
                             "critic is trained by the value loss alone)")
    value_clip: float = _f(0.2, "PPO: clipping of the value loss around the rollout's values")
    entropy_coef: float = _f(0.0, "PPO: weight of the entropy bonus")
    whiten_advantages: bool = _f(True, "PPO: whiten the advantages over each rollout")


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
    dpo: DPOConfig = field(default_factory=DPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    qat: QATConfig = field(default_factory=QATConfig)
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
    if cfg.peft.init:
        apply_peft_init(cfg)
    validate(cfg)
    return cfg


# Hugging Face module names each family's adapters can target (peft.targets)
PEFT_TARGETS = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                "gpt2": ("c_attn", "c_proj", "c_fc")}
# PEFT's peft_type (adapter_config.json) -> peft.method
PEFT_METHODS = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt",
                "BOTTLENECK": "adapter"}


def apply_peft_init(cfg: Config) -> None:
    """peft.init: the adapter's own adapter_config.json sets peft.method and, for LoRA/DoRA, the rank,
    alpha, dropout, rslora and targets (as the config doc says: its keys override the ones here)."""
    import json

    path = Path(cfg.peft.init) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"peft.init = '{cfg.peft.init}' holds no adapter_config.json; pass a directory that PEFT's "
                          "save_pretrained (or megaloom convert --to peft) wrote")
    a = json.loads(path.read_text(encoding="utf-8"))
    kind = a.get("peft_type")
    if kind not in PEFT_METHODS:
        raise ConfigError(f"peft.init = '{cfg.peft.init}' is a {kind} adapter; megaloom reads "
                          f"{', '.join(PEFT_METHODS)}")
    p = cfg.peft
    p.method = "dora" if kind == "LORA" and a.get("use_dora") else PEFT_METHODS[kind]
    if kind == "LORA":
        targets = a.get("target_modules") or []
        if isinstance(targets, str):
            raise ConfigError(f"peft.init = '{cfg.peft.init}' targets modules by the pattern {targets!r}; megaloom "
                              "needs a list of module names (target_modules=[...])")
        if a.get("rank_pattern") or a.get("alpha_pattern") or a.get("layers_to_transform"):
            raise ConfigError(f"peft.init = '{cfg.peft.init}' varies rank, alpha or layers per module (rank_pattern, "
                              "alpha_pattern, layers_to_transform); megaloom adapts every layer alike")
        p.rank, p.alpha = int(a["r"]), float(a["lora_alpha"])
        p.dropout, p.rslora = float(a.get("lora_dropout", 0.0)), bool(a.get("use_rslora", False))
        p.targets = sorted(targets)
    elif kind == "IA3":
        _ia3_init(cfg, a)
    elif kind in ("PREFIX_TUNING", "PROMPT_TUNING"):
        if a.get("prefix_projection"):
            raise ConfigError(f"peft.init = '{cfg.peft.init}' is prefix tuning with prefix_projection = true (an MLP "
                              "over the prefix); megaloom learns the keys and values themselves (PEFT's default)")
        p.virtual_tokens = int(a["num_virtual_tokens"])


def _ia3_init(cfg: Config, a: dict) -> None:
    """An IA3 adapter's targets; its feed-forward modules (scaled at the input) must be PEFT's defaults,
    the only ones megaloom scales so: down_proj (llama), the MLP's c_proj (gpt2)."""
    targets = a.get("target_modules") or []
    if isinstance(targets, str):
        raise ConfigError(f"peft.init = '{cfg.peft.init}' targets modules by the pattern {targets!r}; megaloom "
                          "needs a list of module names (target_modules=[...])")
    ff = set(a.get("feedforward_modules") or [])
    if cfg.model.family == "gpt2":
        want = {"mlp.c_proj"} if {"c_proj", "mlp.c_proj"} & set(targets) else set()
    else:
        want = {"down_proj"} & set(targets)
    if ff != want:
        raise ConfigError(f"peft.init = '{cfg.peft.init}' scales the inputs of {sorted(ff)} (feedforward_modules); "
                          f"megaloom scales the input of {sorted(want) or 'no module'} for these targets only")
    cfg.peft.targets = sorted(targets)


def _check_peft(cfg: Config) -> None:
    """[peft]: ranges, targets the family has, and what each method composes with."""
    p, m = cfg.peft, cfg.model
    if p.method == "none":
        for key, value in (("peft.quantize_base", p.quantize_base != "none"), ("peft.init", p.init),
                           ("peft.targets", p.targets), ("peft.reference", p.reference != "auto")):
            if value:
                raise ConfigError(f"{key} = {_toml_value(get_value(cfg, key))} needs a peft.method (lora, dora, "
                                  "adapter, prefix, prompt or ia3); set one or remove it")
        return
    if p.rank < 1:
        raise ConfigError(f"peft.rank = {p.rank} must be at least 1; typical ranks are 4 .. 64")
    if p.alpha <= 0:
        raise ConfigError(f"peft.alpha = {p.alpha} must be positive; PEFT's default is 8, twice the rank is common")
    if not 0.0 <= p.dropout < 1.0:
        raise ConfigError(f"peft.dropout = {p.dropout} must be in [0, 1)")
    for key in ("peft.bottleneck", "peft.virtual_tokens"):
        if get_value(cfg, key) < 1:
            raise ConfigError(f"{key} = {get_value(cfg, key)} must be at least 1")
    known = PEFT_TARGETS[m.family]
    if p.method == "ia3" and m.family == "gpt2":  # (IA)³ scales attention's c_proj output, the MLP's c_proj input
        known = (*known, "attn.c_proj", "mlp.c_proj")
    for target in p.targets:
        if target not in known:
            raise ConfigError(f"peft.targets has {target!r}, which a {m.family} model does not have; pick from "
                              f"{' '.join(known)}")
    if len(set(p.targets)) != len(p.targets):
        raise ConfigError(f"peft.targets = {p.targets} names a module twice; list each once")
    if p.method in ("prefix", "prompt"):
        _check_virtual_tokens(cfg)
    if p.reference == "adapters_off" and p.method not in SWITCHABLE_PEFT:
        raise ConfigError(f"peft.reference = \"adapters_off\" but peft.method = \"{p.method}\" changes the sequence the "
                          "model sees and has no switch; set peft.reference = \"copy\" (or \"auto\")")
    lora = p.method in ("lora", "dora")
    if p.quantize_base != "none" and not lora:
        raise ConfigError(f"peft.quantize_base = \"{p.quantize_base}\" (QLoRA) needs peft.method lora or dora "
                          f"(got {p.method}); set peft.quantize_base = \"none\"")


def _check_qat(cfg: Config) -> None:
    """[qat]: a group size that tiles every block linear's input features (each tp rank's share of the
    row-parallel ones: a group must not straddle two ranks), and what QAT composes with."""
    q, m, tp = cfg.qat, cfg.model, cfg.parallel.tp
    if q.scheme == "none":
        if q.group_size:
            raise ConfigError(f"qat.group_size = {q.group_size} needs a qat.scheme (int4-weight, int8-weight or "
                              "int8-dynamic-act-int4-weight); set one or remove it")
        return
    if q.group_size < 0 or q.group_size == 1:
        raise ConfigError(f"qat.group_size = {q.group_size} must be 0 (the scheme's default) or at least 2, e.g. 32")
    group = q.group_size or (0 if q.scheme == "int8-weight" else 32)
    widths = (("attn.qkv", m.hidden, 1), ("attn.proj", m.heads * m.head_dim, tp), ("mlp.up", m.hidden, 1),
              ("mlp.down", m.ffn, tp))
    for name, width, t in widths:
        if group and (width % t or (width // t) % group):
            where = f"each of the parallel.tp = {t} ranks' {width // t} of {name}'s {width}" if t > 1 else \
                f"{name}'s {width}"
            raise ConfigError(f"qat.group_size = {group} does not divide {where} input features (a group may not "
                              f"straddle tp ranks); pick a group size that divides {width // t}, e.g. "
                              f"{_divisor_near(width // t, 32)}")
    if cfg.train.objective not in ("lm", "sft", "distill"):
        raise ConfigError(f"qat.scheme = \"{q.scheme}\" applies to train.objective lm, sft or distill (got "
                          f"\"{cfg.train.objective}\"); set qat.scheme = \"none\"")
    if cfg.peft.method not in ("none", "lora") or cfg.peft.quantize_base != "none":
        what = f"peft.method = \"{cfg.peft.method}\"" if cfg.peft.method not in ("none", "lora") else \
            f"peft.quantize_base = \"{cfg.peft.quantize_base}\""
        raise ConfigError(f"qat.scheme = \"{q.scheme}\" composes with full training and peft.method = \"lora\" "
                          f"(its base fake-quantized), not with {what}; change one of them")
    if cfg.parallel.schedule == "zb-h1" and cfg.parallel.pp > 1:
        raise ConfigError(f"qat.scheme = \"{q.scheme}\" with parallel.schedule = \"zb-h1\": the deferred weight "
                          "gradients see the fake-quantized weight, not the parameter; use another schedule")


def _check_virtual_tokens(cfg: Config) -> None:
    """Prefix and prompt tuning put peft.virtual_tokens positions before the real tokens (megaloom/tune/prompt.py)."""
    m, p, t = cfg.model, cfg.peft, cfg.parallel.tp
    if m.family == "gpt2" and m.seq_len + p.virtual_tokens > m.positions:
        raise ConfigError(f"peft.virtual_tokens = {p.virtual_tokens}: with model.seq_len = {m.seq_len} the real tokens "
                          f"reach position {m.seq_len + p.virtual_tokens - 1}, past GPT-2's {m.positions} learned "
                          f"positions; set model.seq_len = {m.positions - p.virtual_tokens} or less")
    if p.method == "prompt" and cfg.parallel.sequence_parallel and p.virtual_tokens % t:
        raise ConfigError(f"peft.virtual_tokens = {p.virtual_tokens}: sequence parallelism splits the soft prompt's "
                          f"positions with the others over parallel.tp = {t}; make it a multiple of {t}")
    if p.method == "prompt" and p.prompt_init_text and not m.pretrained:
        raise ConfigError("peft.prompt_init_text is read with model.pretrained's tokenizer; set model.pretrained "
                          "or leave peft.prompt_init_text empty (random init)")


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
    _check_peft(cfg)
    _check_qat(cfg)
    if p.powersgd_rank < 0 or (p.powersgd_rank and p.zero >= 2):
        raise ConfigError(f"parallel.powersgd_rank = {p.powersgd_rank} needs parallel.zero 0 or 1 (got {p.zero}) "
                          "and must not be negative; FSDP's reduce-scatter (ZeRO-2/3) is not compressed")
    check_layout(m, layout_spec(cfg))  # the same check as `megaloom simulate` and `megaloom plan`
    if cfg.peft.quantize_base == "nf4":  # before the model is built and loaded (QLoRA quantizes after loading)
        from megaloom.tune.nf4_layout import check_nf4_layout  # torch-free

        check_nf4_layout(m, p.tp, p.dp if p.zero >= 2 else 1)
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
    """The conversation keys need an objective that reads records (sft, dpo), and those need record files."""
    d, objective = cfg.data, cfg.train.objective
    if objective == "distill":  # its data are checked as those of the objective that reads them
        _check_distill(cfg)
        objective = "lm" if cfg.distill.data == "text" else "sft"
    if objective == "lm":
        sft_only = {"data.packing": d.packing, "data.train_on_prompt": d.train_on_prompt,
                    "data.format": d.format != "auto", "data.chat_template": d.chat_template}
        for key, value in sft_only.items():
            if value:
                raise ConfigError(f"{key} = {_toml_value(get_value(cfg, key))} applies to supervised fine-tuning "
                                  "only; set train.objective=\"sft\" or remove it")
        return
    if "stdlib" in d.sources:
        raise ConfigError(f"train.objective = \"{objective}\" reads conversations, but data.sources has \"stdlib\"; "
                          "give .jsonl or .parquet files, e.g. from tools/build_instruct.py")
    pairs = objective in ("dpo", "reward")
    if d.format not in ("auto", "preference") and pairs:
        raise ConfigError(f"data.format = \"{d.format}\" but train.objective = \"{objective}\" reads preference "
                          "pairs; set data.format=\"preference\" or \"auto\"")
    if d.format == "preference" and not pairs:
        raise ConfigError(f"data.format = \"preference\" is read by train.objective = \"dpo\" or \"reward\", not "
                          f"\"{objective}\"; set train.objective=\"dpo\"")
    if pairs and (d.packing or d.train_on_prompt):
        key = "data.packing" if d.packing else "data.train_on_prompt"
        raise ConfigError(f"{key} = true does not apply to preference pairs (train.objective = \"{objective}\"); "
                          "remove it")
    if objective in ("grpo", "ppo"):
        if d.format not in ("auto", "prompt"):
            raise ConfigError(f"data.format = \"{d.format}\" but train.objective = \"{objective}\" reads prompts; "
                              "set data.format=\"prompt\" or \"auto\"")
        if d.packing or d.train_on_prompt:
            raise ConfigError(f"data.packing and data.train_on_prompt do not apply to train.objective = "
                              f"\"{objective}\"; remove them")
        r, t = cfg.rl, cfg.train
        if objective == "ppo":
            rollout = r.rollout_batch or t.global_batch
            if r.ppo_epochs < 1 or rollout % t.global_batch or r.group_size < 1:
                raise ConfigError(f"rl.rollout_batch ({rollout}) must be a multiple of train.global_batch "
                                  f"({t.global_batch}), rl.ppo_epochs ({r.ppo_epochs}) and rl.group_size "
                                  f"({r.group_size}) at least 1")
            if r.kl_coef < 0 or r.kl_target < 0 or r.vf_coef < 0 or not 0 <= r.lam <= 1 or not 0 < r.gamma <= 1:
                raise ConfigError(f"rl.kl_coef ({r.kl_coef}), rl.kl_target ({r.kl_target}), rl.vf_coef ({r.vf_coef}) "
                                  f"must not be negative; rl.lam ({r.lam}) in [0, 1], rl.gamma ({r.gamma}) in (0, 1]")
        elif r.critic != "shared":
            raise ConfigError(f"rl.critic = \"{r.critic}\" applies to train.objective = \"ppo\" (GRPO has no critic); "
                              "remove it")
        if objective == "grpo" and r.group_size < 2:
            raise ConfigError(f"rl.group_size = {r.group_size}: group-normalised advantages need at least 2 "
                              "completions per prompt; use 4 or more")
        if r.max_new_tokens < 1 or r.max_new_tokens >= cfg.model.seq_len:
            raise ConfigError(f"rl.max_new_tokens = {r.max_new_tokens} must be in [1, model.seq_len = "
                              f"{cfg.model.seq_len}); leave room for the prompt")
        if r.temperature <= 0 or not 0 < r.top_p <= 1 or r.beta < 0 or r.clip <= 0:
            raise ConfigError(f"rl.temperature ({r.temperature}) and rl.clip ({r.clip}) must be positive, rl.top_p "
                              f"({r.top_p}) in (0, 1], rl.beta ({r.beta}) not negative")
        if (r.reward not in ("exact_match", "last_number") and r.reward.count(":") != 1
                and not (objective == "ppo" and Path(r.reward).is_dir())):
            raise ConfigError(f"rl.reward = \"{r.reward}\" is neither exact_match, last_number, \"module:function\" nor "
                              "(PPO) a reward model's run directory")
    elif d.format == "prompt":
        raise ConfigError(f"data.format = \"prompt\" is read by train.objective = \"grpo\" or \"ppo\", not "
                          f"\"{objective}\"")
    if cfg.reward.center_coefficient < 0:
        raise ConfigError(f"reward.center_coefficient = {cfg.reward.center_coefficient} must not be negative; "
                          "TRL suggests 0.01")
    if objective == "dpo":
        o = cfg.dpo
        if o.beta <= 0:
            raise ConfigError(f"dpo.beta = {o.beta} must be positive; typical values are 0.01 .. 0.5")
        if not 0.0 <= o.label_smoothing < 0.5 or (o.label_smoothing and o.loss in ("ipo", "hinge")):
            raise ConfigError(f"dpo.label_smoothing = {o.label_smoothing} must be in [0, 0.5) and applies to the "
                              f"sigmoid and simpo losses (dpo.loss = \"{o.loss}\"); set it to 0")


def _check_distill(cfg: Config) -> None:
    o = cfg.distill
    if not o.teacher:
        raise ConfigError("train.objective = \"distill\" needs distill.teacher, the MODEL to learn from (a run "
                          "directory, checkpoint, Hugging Face directory or .gguf)")
    if not 0.0 <= o.alpha <= 1.0:
        raise ConfigError(f"distill.alpha = {o.alpha} must be in [0, 1] (the cross entropy's weight; 0 = pure "
                          "distillation)")
    if o.temperature <= 0:
        raise ConfigError(f"distill.temperature = {o.temperature} must be positive; 1 leaves the logits as they are")
    if o.loss == "jsd" and not 0.0 < o.beta < 1.0:
        raise ConfigError(f"distill.beta = {o.beta} must be in (0, 1) for distill.loss = \"jsd\"; beta 0 and 1 are "
                          "distill.loss = \"forward_kl\" and \"reverse_kl\"")
    layers = o.init_from_teacher_layers
    if layers:
        if len(layers) != cfg.model.layers or len(set(layers)) != len(layers) or min(layers) < 0:
            raise ConfigError(f"distill.init_from_teacher_layers = {layers} must name model.layers = "
                              f"{cfg.model.layers} distinct teacher layers (0-based), one per student layer")
        if cfg.model.pretrained or cfg.checkpoint.load:
            key = "model.pretrained" if cfg.model.pretrained else "checkpoint.load"
            raise ConfigError(f"distill.init_from_teacher_layers and {key} both say where the student starts; "
                              "keep one")


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
