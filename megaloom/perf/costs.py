"""What one layout costs: the time of each pipeline stage's passes and the memory of each GPU.

A `Job` is a model, a cluster, a GPU count, a global batch and a `Layout` (t, p, d, b, v, recompute,
ZeRO, sequence parallelism). `StageCosts` turns it into seconds per forward / backward of one
microbatch on each pipeline stage, from:

- the GEMMs of a layer, timed by the GEMM model of `hardware.py` (shapes per tensor-parallel rank;
  backward = a data-gradient and a weight-gradient GEMM per forward GEMM);
- attention: flash attention's FLOPs (causal, half the s x s blocks) at ATTENTION_FRACTION of peak, or
  the materialized scores of the 2021 Megatron-LM as batched GEMMs plus a fused softmax;
- memory-bound kernels (norms, residual adds, activation functions, casts, the loss): bytes moved per
  token, counted for each `Recipe`, at the achieved memory bandwidth;
- on a device `megaloom calibrate` measured, the fixed cost of each pass beyond its arithmetic (operator
  dispatch, autograd, Python: `Device.pass_seconds`), added on a CPU, overlapped on a GPU;
- tensor-parallel collectives: 2 all-reduces of b·s·h in forward and 2 in backward per layer (§3.2
  of Narayanan et al. 2021; with sequence parallelism all-gather + reduce-scatter, the same time),
  plus 2 more under full recomputation;
- ZeRO-3 parameter gathers, prefetched one layer ahead so they hide behind compute when they can.

Memory follows Korthikanti et al. 2022 for the activations and `memory.state_bytes_per_parameter`
(ZeRO §3) for the model state; how many microbatches each rank keeps alive comes from the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache

from megaloom.config import Config, ConfigError, ModelConfig
from megaloom.layout import FLAG_NAMES, LayoutSpec, ScheduleKind, check_layout, vocab_rows
from megaloom.parallel.schedules import build_schedule, in_flight
from megaloom.perf import flops, memory
from megaloom.perf.cluster import Cluster
from megaloom.perf.collectives import Collective, collective_seconds
from megaloom.perf.hardware import gemm_seconds

GIB = 2**30
# flash attention's achieved fraction of the dense peak: FlashAttention-2, the kernel behind PyTorch SDPA's
# flash backend, reaches 35% of an H100's (Shah et al. 2024, FlashAttention-3, abstract); used on every
# device, as GEMM_EFFICIENCY is (Dao 2023 reports 50-73% on A100 for the forward pass)
ATTENTION_FRACTION = 0.35
USABLE_MEMORY = 0.92  # the rest: CUDA context, NCCL buffers, allocator fragmentation (an assumption)
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Recipe:
    """How the training program is written: what it keeps for backward and what its small kernels move.

    Units: bytes per token per layer divided by h (or by the MLP width f, or per vocabulary entry).
    """

    name: str
    flash_attention: bool
    act_replicated: float  # kept for backward, the same on every tp rank (split by t under sequence parallelism)
    act_parallel: float  # kept for backward, split by t
    act_input: float  # the layer input kept under full recomputation
    traffic_replicated: float  # forward bytes of memory-bound kernels outside the tp-split region
    traffic_parallel: float  # forward bytes of memory-bound kernels on tp-split tensors of width h
    traffic_mlp: float  # forward bytes of the MLP activation function, per MLP column (f)
    loss_traffic: float  # forward + backward bytes of the loss, per vocabulary entry
    loss_memory: float  # bytes per vocabulary entry alive when the backward starts
    state_at_peak: float | None  # bytes/parameter alive at the activation peak; None = all of it (ZeRO rule)
    weight_traffic: float = 0.0  # bytes per parameter and microbatch moved to cast weights and their gradients
    fp32_weights: bool = False  # fp32 weights and residual stream under autocast (megaloom's own program)
    # what the program can do: sequence parallelism and selective recomputation came with Korthikanti
    # et al. 2022, after the Megatron-LM paper's runs (Narayanan et al. 2021 had full recomputation only)
    sequence_parallel: bool = True
    selective_recompute: bool = True
    # ZeRO: Megatron-LM of 2021 replicated the optimizer state over dp; its distributed optimizer (ZeRO-1)
    # came in 2022 and it never sharded gradients or parameters. A search leaves ZeRO off for it.
    zero: bool = True
    # p2p overlapped with compute. Megatron-LM of the paper's time waited for every batch_isend_irecv
    # and then called torch.cuda.synchronize() ("to protect against race condition when using
    # batch_isend_irecv()", megatron/p2p_communication.py): a rank stood still while its activations
    # and gradients crossed to the next stage
    overlap_p2p: bool = True
    # the data-parallel gradient reduction overlapped with the backward, bucket by bucket. Megatron-LM of the
    # paper's time all-reduced its whole contiguous gradient buffer (fp32 main grads under bf16) after
    # forward_backward_func had returned (training.py train_step -> model.allreduce_gradients(), DDP_impl
    # "local", the default); overlapping it came with --overlap-grad-reduce (2023)
    overlap_grad_reduce: bool = True
    # the head's loss computes its gradients in the forward, chunk by chunk (megaloom/model/loss.py and
    # parallel/vocab_loss.py, as Liger Kernel's fused linear cross entropy): the forward pays the logit GEMM,
    # both gradient GEMMs and all of the loss's traffic, the backward only scales the two stored gradients;
    # what stays for backward is dL/dh (fp32, b·s·h) and dL/dW (fp32, V/t·h), never the logits
    head_grads_in_forward: bool = False


# Megatron-LM's GPT with fused kernels (bias-GeLU, bias-dropout-add, fused LayerNorm), bf16 activations,
# flash attention. Kept activations: Korthikanti et al. 2022 §4.1: 10·sbh outside the tp region and
# 24·sbh inside it (the 5·a·s/h score term is gone with flash attention). Traffic, forward, per token:
# two LayerNorms (read 2h, write 2h) and two bias-dropout-adds (read 4h, write 2h, mask h) = 22h; the
# fused bias-GeLU reads and writes the 2-byte MLP activation (4 bytes per column); backward moves twice
# the forward bytes. Vocab-parallel cross entropy in fp32: 38 bytes per logit forward, 22 backward;
# it keeps the fp32 softmax (4) and meets its fp32 gradient (4) and the bf16 logits (2).
MEGATRON = Recipe("megatron", True, 10, 24, 2, 22, 0, 4, 60, 10, None)

# The same program as 2021's Megatron-LM ran it (the paper's runs): attention scores materialized,
# with the 5·a·s/h term in memory and the batched score GEMMs and fused softmax in time.
MEGATRON_2021 = Recipe("megatron-2021", False, 10, 24, 2, 22, 0, 4, 60, 10, None,
                       sequence_parallel=False, selective_recompute=False, zero=False, overlap_p2p=False,
                       overlap_grad_reduce=False)

# The plain-PyTorch nanoGPT program of the H100 measurements of 2026-11-24 (bench/RESULTS.md):
# fp32 weights under bf16 autocast, the residual stream and LayerNorms in fp32, SDPA flash attention,
# GeLU-tanh as its own kernel.
# Kept per layer: LayerNorm inputs 2 x 4h (fp32) and their bf16 casts 2 x 2h = 12h outside the heads;
# qkv 6h, attention output 2h and its contiguous copy 2h, GeLU input and output 2 x 8h = 26h inside.
# Forward traffic: 2 x (LayerNorm 8h + cast 6h + residual add 10h) = 48h; the transpose copy 4h;
# GeLU 4 bytes per MLP column. Cross entropy on fp32 logits: cast (6), log-softmax (12), its gradient
# (4 + 12) and the cast back (6) = 40 bytes per logit; at the peak the fp32 log-probabilities, their
# gradient and the logit gradient are alive (12). Weights (4), Adam moments (8) and autocast's bf16
# weight copies (2) are alive at the peak; gradients (4) are allocated as the activations are freed.
# Autocast re-casts every fp32 weight to bf16 in each forward (read 4, write 2) and autograd casts each
# bf16 weight gradient to fp32 (read 2, write 4): 12 bytes per parameter and microbatch. (Megatron keeps
# bf16 weights and fuses gradient accumulation into the weight-gradient GEMM: none.)
EAGER = Recipe("eager", True, 12, 26, 4, 48, 4, 4, 40, 12, 14, 12, True)

# megaloom's own program (`megaloom train`; Job.from_config, `megaloom info`): the eager program above with the
# chunked linear cross entropy as its head (megaloom/model/loss.py): the loss's gradients computed in the
# forward, no logits kept (loss_memory 0; its two gradient buffers are counted in StageCosts.memory_bytes).
MEGALOOM = replace(EAGER, name="megaloom", loss_memory=0.0, head_grads_in_forward=True)

RECIPES = {r.name: r for r in (MEGATRON, MEGATRON_2021, EAGER, MEGALOOM)}


@dataclass(frozen=True)
class Layout:
    """How a job is split: the planner's search space and `megaloom simulate`'s flags."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    microbatch: int = 1
    chunks: int = 1
    recompute: str = "none"
    zero: int = 0
    sequence_parallel: bool = False
    schedule: str = ""  # empty: "interleaved" when chunks > 1, else "1f1b"
    layers_per_stage: tuple[int, ...] = ()  # empty: model.layers / (pp·chunks) each (parallel.layers_per_stage)

    @property
    def schedule_kind(self) -> ScheduleKind:
        if self.schedule:
            return ScheduleKind(self.schedule)
        return ScheduleKind.INTERLEAVED if self.chunks > 1 else ScheduleKind.ONE_F_ONE_B

    def fields(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "microbatch": self.microbatch, "chunks": self.chunks,
                "recompute": self.recompute, "zero": self.zero, "sequence_parallel": self.sequence_parallel,
                "schedule": self.schedule_kind.value}

    def __str__(self) -> str:
        s = f"t={self.tp} p={self.pp} d={self.dp} b={self.microbatch} v={self.chunks} recompute={self.recompute}"
        return s + f" zero={self.zero}" + (" sp" if self.sequence_parallel else "")


@dataclass(frozen=True)
class Job:
    model: ModelConfig
    cluster: Cluster
    gpus: int
    global_batch: int
    layout: Layout
    recipe: Recipe = MEGATRON
    precision: str = "bf16"  # train.precision: the dtype of activations, p2p and ZeRO-2/3 gathers (fp32: 4 bytes)
    grad_reduce_dtype: str = "fp32"  # parallel.grad_reduce_dtype: the data-parallel gradient reduction's dtype

    @classmethod
    def from_config(cls, cfg: Config, cluster: Cluster, gpus: int | None = None) -> Job:
        """A training config as megaloom runs it: its model, layout (parallel.*, train.micro_batch,
        train.recompute), precision, and megaloom's own program (the megaloom recipe: fp32 weights under
        autocast). `gpus` defaults to t·p·d."""
        p, t = cfg.parallel, cfg.train
        gpus = gpus or p.tp * p.pp * p.dp
        layout = Layout(p.tp, p.pp, gpus // (p.tp * p.pp), t.micro_batch, p.chunks, t.recompute, p.zero,
                        p.sequence_parallel, p.schedule if p.pp > 1 else "", tuple(p.layers_per_stage))
        return cls(cfg.model, cluster, gpus, t.global_batch, layout, MEGALOOM, t.precision, p.grad_reduce_dtype)

    @property
    def activation_bytes(self) -> int:
        """Bytes per value of the activations under autocast (and on the pipeline's wire)."""
        return 4 if self.precision == "fp32" else 2

    @property
    def residual_bytes(self) -> int:
        """Bytes per value of the residual stream (embedding output, final norm): fp32 in megaloom's
        program (fp32 weights), the compute dtype in Megatron's."""
        return 4 if self.recipe.fp32_weights else self.activation_bytes

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.layout.microbatch * self.layout.dp)


def check_job(model: ModelConfig, gpus: int, global_batch: int, lay: Layout, cluster: Cluster | None = None) -> None:
    """One-line errors naming the flag, the value and the fix."""
    t, p, v = lay.tp, lay.pp, lay.chunks
    for name, value in (("--gpus", gpus), ("--tp", t), ("--pp", p), ("--microbatch", lay.microbatch),
                        ("--chunks", v), ("--global-batch", global_batch)):
        if value < 1:
            raise ConfigError(f"{name} ({value}) must be >= 1")
    if gpus % (t * p):
        raise ConfigError(f"--gpus ({gpus}) must be a multiple of --tp x --pp ({t} x {p} = {t * p}), "
                          f"since d = gpus / (tp·pp); change --gpus, --tp or --pp")
    if lay.dp != gpus // (t * p):
        raise ConfigError(f"dp ({lay.dp}) must be --gpus / (--tp x --pp) = {gpus // (t * p)}")
    if lay.recompute not in RECOMPUTE:
        raise ConfigError(f"--recompute {lay.recompute!r}: choose none, selective or full")
    # the rest is the runtime's own check (megaloom/layout.py), so both accept and refuse the same layouts
    check_layout(model, LayoutSpec(tp=t, pp=p, dp=lay.dp, chunks=v, microbatch=lay.microbatch, global_batch=global_batch,
                                   zero=lay.zero, schedule=lay.schedule, sequence_parallel=lay.sequence_parallel,
                                   layers_per_stage=lay.layers_per_stage), FLAG_NAMES)


# ---------------------------------------------------------------- time


@dataclass(frozen=True)
class PassTime:
    """Seconds of one microbatch through one model chunk, split by what the time is spent on."""

    forward: float
    backward_input: float  # data gradients, attention and memory-bound backward, tp collectives
    backward_weight: float  # weight-gradient GEMMs
    tp_comm: float  # the tp collectives inside the three above
    recompute: float  # the extra forward work inside backward_input

    @property
    def backward(self) -> float:
        return self.backward_input + self.backward_weight


def _gemms(m: ModelConfig, t: int) -> list[tuple[int, int]]:
    """(output columns, reduction depth) of a layer's forward GEMMs on one tp rank; rows are b·s tokens."""
    h, f, kv = m.hidden, m.ffn, m.n_kv_heads * m.head_dim
    up = 2 * f if m.family == "llama" else f  # SwiGLU's gate and up projections
    return [((h + 2 * kv) // t, h), (h, h // t), (up // t, h), (h, f // t)]


@dataclass
class StageCosts:
    """Per-layer and per-stage pass times of a job, and its memory; computed once, read by the simulator."""

    job: Job
    _cache: dict = field(default_factory=dict)

    @cached_property
    def dev(self):  # noqa: ANN201
        return self.job.cluster.device

    @cached_property
    def tp_group(self) -> tuple[int, ...]:
        return tuple(range(self.job.layout.tp))

    def _allreduce(self, nbytes: float) -> float:
        return collective_seconds(self.job.cluster, Collective.ALL_REDUCE, nbytes, self.tp_group)

    @cached_property
    def layer(self) -> PassTime:
        """One transformer layer, one microbatch, one tp rank."""
        m, lay, r = self.job.model, self.job.layout, self.job.recipe
        t, b, s, h, a = lay.tp, lay.microbatch, m.seq_len, m.hidden, m.heads
        tokens = b * s
        fwd = wgrad = dgrad = 0.0
        for n, k in _gemms(m, t):
            fwd += gemm_seconds(self.dev, tokens, n, k)
            dgrad += gemm_seconds(self.dev, tokens, k, n)
            wgrad += gemm_seconds(self.dev, k, n, tokens)
        attn_f, attn_b = self._attention(b, s, h, a, t)
        split = t if lay.sequence_parallel else 1
        traffic = tokens * (r.traffic_replicated * h / split + r.traffic_parallel * h / t + r.traffic_mlp * m.ffn / t)
        mem_f = traffic / self.dev.copy_bytes_per_s
        casts = self.layer_rank_parameters * r.weight_traffic / 2 / self.dev.copy_bytes_per_s  # half each way
        fwd += casts
        wgrad += casts
        comm = 2 * self._allreduce(tokens * h * 2) if t > 1 else 0.0
        forward = self.dev.pass_seconds(fwd + attn_f + mem_f, "layer_forward") + comm
        recompute = {"none": 0.0, "selective": attn_f, "full": forward}[lay.recompute]
        backward_input = self.dev.pass_seconds(dgrad + attn_b + 2 * mem_f, "layer_backward") + comm + recompute
        return PassTime(forward, backward_input, wgrad, comm * (3 if lay.recompute == "full" else 2), recompute)

    def _attention(self, b: int, s: int, h: int, a: int, t: int) -> tuple[float, float]:
        dev, heads = self.dev, a // t
        if self.job.recipe.flash_attention:
            executed = 4 * b * s * s * h / t / 2  # QKᵀ and PV; causal: half the blocks
            fwd = executed / (dev.bf16_tflops * 1e12 * ATTENTION_FRACTION)
            return fwd, 2.5 * fwd  # flash backward: 5 GEMMs to the forward's 2 (Dao 2023)
        d = h // a
        score = gemm_seconds(dev, s, s, d, b * heads) + gemm_seconds(dev, s, d, s, b * heads)
        softmax = 9 * b * heads * s * s / dev.copy_bytes_per_s  # fused scale-mask-softmax + dropout: r2 w2 mask 1, x 9/5
        return score + softmax, 2 * score + 2 * softmax

    @cached_property
    def embedding(self) -> PassTime:
        """Token (and position) lookup on the first stage; vocab-parallel: an all-reduce of b·s·h."""
        lay, m = self.job.layout, self.job.model
        tokens = lay.microbatch * m.seq_len
        fwd = tokens * m.hidden * 2 * 3 / self.dev.copy_bytes_per_s
        comm = self._allreduce(tokens * m.hidden * 2) if lay.tp > 1 else 0.0
        return PassTime(self.dev.pass_seconds(fwd, "embedding_forward") + comm, 0.0,
                        self.dev.pass_seconds(2 * fwd, "embedding_backward"), comm, 0.0)

    @cached_property
    def head(self) -> PassTime:
        """Final norm, logit GEMM and cross entropy on the last stage."""
        lay, m, r = self.job.layout, self.job.model, self.job.recipe
        tokens, vocab = lay.microbatch * m.seq_len, vocab_rows(m.vocab_size, lay.tp)  # the fullest shard
        fwd = gemm_seconds(self.dev, tokens, vocab, m.hidden)
        dgrad = gemm_seconds(self.dev, tokens, m.hidden, vocab)
        wgrad = gemm_seconds(self.dev, m.hidden, vocab, tokens)
        loss = tokens * vocab * r.loss_traffic / self.dev.copy_bytes_per_s
        comm = 3 * self._allreduce(tokens * 4) if lay.tp > 1 else 0.0  # max, sum of exps, target logit
        if r.head_grads_in_forward:  # backward: read and write dL/dh and dL/dW once, scaled by the incoming 1
            scale = 2 * 4 * (tokens + vocab) * m.hidden / self.dev.copy_bytes_per_s
            return PassTime(self.dev.pass_seconds(fwd + dgrad + wgrad + loss, "head_forward") + comm,
                            self.dev.pass_seconds(scale, "head_backward"), 0.0, comm, 0.0)
        return PassTime(self.dev.pass_seconds(fwd + loss * 0.6, "head_forward") + comm,
                        self.dev.pass_seconds(dgrad + loss * 0.4, "head_backward"), wgrad, comm, 0.0)

    def stage_layers(self, stage: int) -> int:
        """Layers of virtual stage `stage`: parallel.layers_per_stage's entry, or an even split."""
        lay = self.job.layout
        if lay.layers_per_stage:
            return lay.layers_per_stage[stage]
        return self.job.model.layers // (lay.pp * lay.chunks)

    def rank_layers(self, rank: int) -> list[int]:
        """Layers of each model chunk of pipeline rank `rank` (stage c·p + r, §2.2.2)."""
        lay = self.job.layout
        return [self.stage_layers(c * lay.pp + rank) for c in range(lay.chunks)]

    def chunk(self, stage: int) -> PassTime:
        """One microbatch through virtual stage `stage` (layers/(p·v) layers, plus embedding or head)."""
        if stage not in self._cache:
            lay = self.job.layout
            parts = [(self.layer, self.stage_layers(stage))]
            if stage == 0:
                parts.append((self.embedding, 1))
            if stage == lay.pp * lay.chunks - 1:
                parts.append((self.head, 1))
            self._cache[stage] = PassTime(*(sum(getattr(pt, f) * k for pt, k in parts)
                                            for f in ("forward", "backward_input", "backward_weight", "tp_comm",
                                                      "recompute")))
        return self._cache[stage]

    # ------------------------------------------------------------ parameters and memory

    @cached_property
    def layer_parameters(self) -> float:
        m = self.job.model
        return (flops.parameters(m) - self._outside_layers()) / m.layers

    def _outside_layers(self) -> float:
        m = self.job.model
        if m.family == "gpt2":
            return m.vocab_size * m.hidden + m.seq_len * m.hidden + 2 * m.hidden
        return 2 * m.vocab_size * m.hidden + m.hidden

    @cached_property
    def layer_split(self) -> tuple[float, float]:
        """A layer's parameters as (split over the tp ranks, held whole by every tp rank): column- and
        row-parallel weights and column-parallel biases are split; norms and row-parallel biases are not."""
        m = self.job.model
        h, f, kv = m.hidden, m.ffn, m.n_kv_heads * m.head_dim
        if m.family == "gpt2":
            return h * (h + 2 * kv) + (h + 2 * kv) + h * h + 2 * h * f + f, h + h + 2 * 2 * h
        return h * (h + 2 * kv) + h * h + 3 * h * f, 2 * h

    @cached_property
    def layer_rank_parameters(self) -> float:
        """Parameters of one layer that one tp rank holds."""
        split, whole = self.layer_split
        return split / self.job.layout.tp + whole

    def stage_split(self, stage: int) -> tuple[float, float]:
        """Parameters of virtual stage `stage` as (split over tp, whole on every tp rank), before the
        split: its layers; the first stage adds the vocab-parallel embedding (and GPT-2's positions,
        whole), the last the final norm (whole) and the head, or under pipelining GPT-2's copy of the
        tied embedding (Megatron's, §2.2)."""
        lay, m = self.job.layout, self.job.model
        split, whole = (x * self.stage_layers(stage) for x in self.layer_split)
        emb = vocab_rows(m.vocab_size, lay.tp) * lay.tp * m.hidden  # each tp rank holds ceil(V/t) rows, padding too
        if stage == 0:
            split += emb
            whole += m.seq_len * m.hidden if m.family == "gpt2" else 0
        if stage == lay.pp * lay.chunks - 1:
            whole += 2 * m.hidden if m.family == "gpt2" else m.hidden
            if m.family == "llama" or lay.pp > 1:
                split += emb
        return split, whole

    def stage_parameters(self, stage: int) -> float:
        """Parameters one tp rank holds for virtual stage `stage`."""
        split, whole = self.stage_split(stage)
        return split / self.job.layout.tp + whole

    def rank_split(self, rank: int) -> tuple[float, float]:
        """`stage_split` summed over the model chunks of pipeline rank `rank` (stages c·p + rank)."""
        lay = self.job.layout
        parts = [self.stage_split(c * lay.pp + rank) for c in range(lay.chunks)]
        return sum(x for x, _ in parts), sum(y for _, y in parts)

    def rank_parameters(self, rank: int) -> float:
        """Parameters held by one tp rank of pipeline rank `rank`."""
        split, whole = self.rank_split(rank)
        return split / self.job.layout.tp + whole

    def activation_bytes_per_layer(self) -> float:
        """Bytes one layer keeps for one microbatch. For the Megatron recipes this is Korthikanti et al.
        2022's s·b·h·(10 + 24/t + 5·a·s/(h·t)) and its sequence-parallel and recomputed forms
        (`memory.activation_bytes_per_layer`, tested equal); flash attention never keeps the 5·a·s/h
        scores, and selective recomputation drops them."""
        lay, m, r = self.job.layout, self.job.model, self.job.recipe
        t, sbh = lay.tp, lay.microbatch * m.seq_len * m.hidden
        split = t if lay.sequence_parallel else 1
        if lay.recompute == "full":
            return r.act_input * sbh / split
        scores = 0.0 if r.flash_attention or lay.recompute == "selective" else 5 * m.heads * m.seq_len / m.hidden
        return sbh * (r.act_replicated / split + (r.act_parallel + scores) / t)

    def full_layer_bytes(self) -> float:
        """One layer's complete activations: the working set of a recomputed layer in backward."""
        lay, m, r = self.job.layout, self.job.model, self.job.recipe
        sbh = lay.microbatch * m.seq_len * m.hidden
        split = lay.tp if lay.sequence_parallel else 1
        return sbh * (r.act_replicated / split + r.act_parallel / lay.tp)

    def peak_memory(self) -> tuple[float, float, float]:
        """(model state, activations, total) of the pipeline rank with the highest peak, holding the
        schedule's peak number of microbatch-chunks."""
        lay = self.job.layout
        return max((self.memory_bytes(r, peak_in_flight(lay.schedule_kind, lay.pp, self.job.microbatches, lay.chunks, r))
                    for r in range(lay.pp)), key=lambda x: x[2])

    def memory_bytes(self, rank: int, in_flight: int) -> tuple[float, float, float]:
        """(model state, activations, total peak) of pipeline rank `rank` holding `in_flight` microbatch-chunks."""
        lay, m, r = self.job.layout, self.job.model, self.job.recipe
        params = self.rank_parameters(rank)
        full = params * memory.state_bytes_per_parameter(lay.zero, lay.dp, r.fp32_weights)
        at_peak = full if r.state_at_peak is None else params * r.state_at_peak
        if lay.zero == 3:  # the gathered weights of the layer in use and the one being prefetched
            at_peak += 2 * self.job.activation_bytes * self.layer_rank_parameters
        if lay.zero >= 2 and lay.dp > 1 and self.job.microbatches > 1:
            # FSDP2 accumulates the micro-batches' gradients unsharded (reduce dtype) until the last one
            at_peak += params * (2 if self.job.grad_reduce_dtype == "bf16" else 4)
        per_chunk = max(self.rank_layers(rank))
        act = in_flight * per_chunk * self.activation_bytes_per_layer()
        if lay.recompute == "full":
            act += self.full_layer_bytes()
        tokens = lay.microbatch * m.seq_len
        if rank == 0:  # the embedding output, kept for the first layer's backward
            act += tokens * m.hidden * 2
        if rank == lay.pp - 1:  # the loss and its gradient, one microbatch at a time
            act += tokens * vocab_rows(m.vocab_size, lay.tp) * r.loss_memory
            if r.head_grads_in_forward:  # the head's stored fp32 gradients, dL/dh and dL/dW
                act += 4 * (tokens + vocab_rows(m.vocab_size, lay.tp)) * m.hidden
        return full, act, max(at_peak + act, full)


def peak_in_flight(kind: ScheduleKind, p: int, m: int, v: int, rank: int = 0) -> int:
    """Microbatch-chunks whose activations rank `rank` holds at once, counted on the schedule's own
    action lists (`schedules.in_flight`, the one counter)."""
    if kind is ScheduleKind.GPIPE:  # all forwards before any backward: every micro-batch (tested equal)
        return m
    # past the warm-up the other schedules hold a steady number, reached within the first 2·p·v
    # micro-batches: count on at most that many (tests/unit/test_layout.py checks the cap is exact)
    return _in_flight_per_rank(kind, p, min(m, 2 * p * max(v, 1)), v)[rank]


@lru_cache(maxsize=256)
def _in_flight_per_rank(kind: ScheduleKind, p: int, m: int, v: int) -> tuple[int, ...]:
    return in_flight(build_schedule(kind, p, m, v))
