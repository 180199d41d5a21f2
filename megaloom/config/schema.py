"""The configuration's sections: one dataclass per TOML table, each field with its default and `help`."""

from __future__ import annotations

import dataclasses
import keyword
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


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


def attr_name(key: str) -> str:
    """The dataclass field of a config key: a Python keyword (checkpoint.async) gets a trailing _."""
    return key + "_" if keyword.iskeyword(key) else key


def key_name(attr: str) -> str:
    return attr[:-1] if attr.endswith("_") and keyword.iskeyword(attr[:-1]) else attr


def keys_of(typ: type) -> dict[str, Any]:
    """The config keys of a section and their types."""
    return {key_name(name): t for name, t in typing.get_type_hints(typ).items()}

def get_value(cfg: Config, dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    return getattr(getattr(cfg, section), attr_name(key))


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return str(v)
