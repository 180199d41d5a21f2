"""Assembly: a config and a process grid in, this rank's part of a parallel model (and its optimizer) out.

This is the one place that puts the parallel mechanisms of `megaloom.parallel` around the model code of
`megaloom.model` (DESIGN principle 6): tensor parallelism (`parallelize_tensor`), the pipeline chunks
and their runner, ZeRO-2/3 (FSDP2 `fully_shard`) or the data-parallel gradient buffer, recomputation,
and the gradient sync. `build_parallel_model` may be called several times in one process (a policy, a
frozen reference, a reward model, a critic on one grid); every call is collective (every rank calls it,
in the same order) because it may create process groups. Frozen parameters (`requires_grad = False`,
or `trainable=False` for a whole model) are left out of the optimizer, the gradient buffers and the
gradient norm; a model built with `trainable=False` gets no gradient buffer, no sync and no optimizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megaloom.config import Config
from megaloom.layout import stage_layers
from megaloom.model import build_model
from megaloom.model.dropout import LayoutDropout
from megaloom.model.init import init_model
from megaloom.model.recompute import set_recompute
from megaloom.model.transformer import Transformer
from megaloom.parallel.comm import CommCounter, TPGroup
from megaloom.parallel.data import DPGroup, GradBuffer, ShardedAdamW
from megaloom.parallel.grads import FSDPState, GradSync
from megaloom.parallel.grid import Axis, ProcessGrid, group_ranks, new_group
from megaloom.parallel.launch import tp_group
from megaloom.parallel.pipeline import PipelineRunner, StageLink, rank_chunk_layers
from megaloom.parallel.schedules import build_schedule, virtual_stage
from megaloom.parallel.tensor import parallelize_tensor
from megaloom.train.optim import build_optimizer

# what a higher layer does to each model chunk before ZeRO wrapping (e.g. insert adapters): (chunk, tp) -> None
Adapt = Callable[[torch.nn.Module, TPGroup | None], None]


@dataclass
class Pipeline:
    """What a pipeline-parallel rank holds: its model chunks, the runner, the tied-embedding group."""

    chunks: list[torch.nn.Module]
    runner: PipelineRunner
    embed_group: dist.ProcessGroup | None
    tied: list[torch.nn.Parameter]
    tied_copy: list[torch.nn.Parameter]


@dataclass
class Training:
    """Everything the step needs on this rank, for any (t, p, d, zero)."""

    model: torch.nn.Module  # the model, or a ModuleList of this rank's pipeline chunks
    optimizer: torch.optim.Optimizer | ShardedAdamW
    sync: GradSync
    runner: PipelineRunner | None
    tp: TPGroup | None
    dp_buffer: GradBuffer | None
    fsdp: FSDPState | None = None

    def counters(self) -> list[tuple[str, CommCounter]]:
        """Every counter of bytes this rank sends, with the group kind that carries them: tp (the
        layers' collectives and the pipeline's scatter/gather all-gather), pp (p2p sends, the tied
        embedding's sum, the norm over stages), dp (gradient buffer or FSDP, the norm over shards)."""
        out = [("pp", self.sync.counters["pp"]), ("dp", self.sync.counters["dp"])]
        if self.tp is not None:
            out.append(("tp", self.tp.counter))
        if self.runner is not None:
            out.append(("pp", self.runner.counter))
        if self.dp_buffer is not None:
            out.append(("dp", self.dp_buffer.counter))
        if self.fsdp is not None:
            out.append(("dp", self.fsdp.counter))
        return out

    def take_comm_bytes(self, steps: int = 1) -> dict:
        """Bytes this rank sent per step since the last call (over `steps` steps): `tp`, `pp`, `dp`
        totals and, beside them, each operation as `<kind>_<op>` (metrics.jsonl's `comm_bytes`)."""
        out = {"tp": 0.0, "pp": 0.0, "dp": 0.0}
        for kind, counter in self.counters():
            for op, sent in counter.take().items():
                out[kind] += sent / steps
                out[f"{kind}_{op}"] = out.get(f"{kind}_{op}", 0.0) + sent / steps
        return out

    @contextlib.contextmanager
    def comm_paused(self) -> Iterator[None]:
        """Nothing is counted inside (evaluation, sampling): `comm_bytes` is the training step's."""
        counters = [c for _, c in self.counters()]
        for c in counters:
            c.paused = True
        try:
            yield
        finally:
            for c in counters:
                c.paused = False


@dataclass
class ParallelModel:
    """One model on the grid, as this rank holds it."""

    model: torch.nn.Module  # the model, or a ModuleList of this rank's pipeline chunks
    tp: TPGroup | None
    pipe: Pipeline | None
    fsdp: FSDPState | None

    @property
    def runner(self) -> PipelineRunner | None:
        return self.pipe.runner if self.pipe is not None else None

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def build_parallel_model(cfg: Config, grid: ProcessGrid, device: torch.device, *, trainable: bool = True,
                         adapt: Adapt | None = None) -> ParallelModel:
    """This rank's part of the model of `cfg` (initialised as its slice of the single-device model) in the
    config's (t, p, d, ZeRO) layout. `trainable=False`: every parameter frozen (a reference or reward
    model); under ZeRO-3 it is still sharded over dp, under ZeRO-1/2 it is replicated (no optimizer state
    to shard). `adapt(chunk, tp)`: called on every model chunk before ZeRO wrapping (parameter-efficient
    fine-tuning: `megaloom.tune.peft.PeftHook` freezes the base and adds the adapters). Collective:
    every rank calls it."""
    tp = tp_group(grid, cfg.parallel.sequence_parallel)
    pipe = build_pipeline(cfg, grid, device, tp) if grid.pp > 1 else None
    if pipe is not None:
        model: torch.nn.Module = torch.nn.ModuleList(pipe.chunks)
    else:
        model = build_model(cfg.model, cfg.train.seed, device, tp=tp)
    if adapt is not None:
        for chunk in pipe.chunks if pipe is not None else [model]:
            adapt(chunk, tp)
    if not trainable:
        model.requires_grad_(False)
    fsdp = None
    if cfg.parallel.zero == 3 or (cfg.parallel.zero == 2 and trainable):
        fsdp = _fully_shard(model, pipe, grid, cfg)
        if pipe is not None:  # FSDP2 replaced the parameter objects: find the tied embeddings again
            pipe.tied = [ch.embed.tok.weight for ch in pipe.chunks if ch.embed is not None]
            pipe.tied_copy = [ch.embed.tok.weight for ch in pipe.chunks if ch.embed is not None and not ch.first]
    set_recompute(model, cfg.train.recompute if trainable else "none")
    per_replica = cfg.train.global_batch // (cfg.train.micro_batch * grid.dp)
    for m in model.modules():  # dropout masks follow the global micro-batch, whichever replica runs it
        if isinstance(m, LayoutDropout):
            m.set_replica(grid.dp_rank, grid.dp, per_replica)
    return ParallelModel(model, tp, pipe, fsdp)


def setup_training(cfg: Config, grid: ProcessGrid, device: torch.device, model: ParallelModel | None = None,
                   adapt: Adapt | None = None) -> Training:
    """The trained model of `cfg` (or `model`, built by `build_parallel_model` and perhaps partly frozen
    since) with its data-parallel gradient buffer, its (possibly ZeRO-sharded) optimizer over the
    trainable parameters only, and the gradient sync. `adapt`: as for `build_parallel_model`."""
    pm = model if model is not None else build_parallel_model(cfg, grid, device, adapt=adapt)
    model, pipe = pm.model, pm.pipe
    dp = DPGroup(grid.dp_group, grid.dp, grid.dp_rank)
    params = pm.trainable()
    buffer = None
    if (grid.dp > 1 or cfg.parallel.zero == 1) and pm.fsdp is None:
        dtype = torch.bfloat16 if cfg.parallel.grad_reduce_dtype == "bf16" else torch.float32
        # under pipelining a bucket never spans two chunks; ZeRO-1 scatters the tied embedding only
        # after its two stages have summed it
        units = [list(c.parameters()) for c in pipe.chunks] if pipe is not None else None
        deferred = pipe.tied if pipe is not None and pipe.embed_group is not None else None
        buffer = GradBuffer(params, dp, dtype, powersgd_rank=cfg.parallel.powersgd_rank, seed=cfg.train.seed,
                            units=units, deferred=deferred)
    optimizer = ShardedAdamW(params, cfg.train, dp) if cfg.parallel.zero == 1 else build_optimizer(model, cfg.train)
    sync = GradSync(model, pm.tp, pp_group=grid.pp_group if grid.pp > 1 else None,
                    embed_group=pipe.embed_group if pipe else None, tied=pipe.tied if pipe else None,
                    tied_copy=pipe.tied_copy if pipe else None, mp_group=grid.mp_group if grid.world_size > 1 else None,
                    dp_buffer=buffer, fsdp=pm.fsdp)
    if pm.runner is not None and params:  # each chunk's dp reduction starts at its last backward
        pm.runner.before_last_backward, pm.runner.after_last_backward = sync.arm, sync.chunk_done
    return Training(model, optimizer, sync, pm.runner, pm.tp, buffer, pm.fsdp)


def _fully_shard(model: torch.nn.Module, pipe: Pipeline | None, grid: ProcessGrid, cfg: Config) -> FSDPState:
    """ZeRO-2 (gradients and optimizer state split over dp) and ZeRO-3 (parameters too, gathered per
    layer for forward and backward) through FSDP2's `fully_shard` on the dp axis of the grid. Each
    transformer block is a unit, then each model (or pipeline chunk) as the root. Gradients accumulate
    unreduced over the micro-batches; each root reduce-scatters in its last backward of the step (under
    pipelining, each chunk's own: `GradSync.arm`)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    zero = cfg.parallel.zero
    policy = fsdp_precision(cfg.train.precision, cfg.parallel.grad_reduce_dtype)

    device_type = next(model.parameters()).device.type
    mesh = DeviceMesh.from_group(grid.dp_group if grid.dp > 1 else _self_group(grid), device_type)
    roots = pipe.chunks if pipe is not None else [model]
    specs = {name: p.shard_spec for name, p in model.named_parameters() if getattr(p, "shard_spec", None)}
    state = FSDPState(roots, grid.dp_group)
    for root in roots:
        for block in root.layers.values():
            fully_shard(block, mesh=mesh, reshard_after_forward=zero == 3, mp_policy=policy)
            state.count(block)
        fully_shard(root, mesh=mesh, reshard_after_forward=zero == 3, mp_policy=policy)
        state.count(root)
    for name, p in model.named_parameters():  # FSDP2 made new parameter objects: keep the tp shard specs
        if name in specs:
            p.shard_spec = specs[name]
    return state


def fsdp_precision(precision: str, grad_reduce_dtype: str):  # noqa: ANN201 (torch's MixedPrecisionPolicy)
    """What FSDP2 gathers and reduces in: parameters gathered in the compute dtype (bf16 under bf16: half
    the all-gather bytes, as the planner counts them; fp16 too), gradients reduce-scattered in fp32
    unless parallel.grad_reduce_dtype = "bf16". The sharded master weights and optimizer state stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    param = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    reduce = torch.bfloat16 if grad_reduce_dtype == "bf16" else torch.float32
    # cast_forward_inputs=False: the residual stream stays fp32, as in every other layout
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce, output_dtype=None, cast_forward_inputs=False)


def _self_group(grid: ProcessGrid) -> dist.ProcessGroup:
    """dp = 1 under ZeRO-2/3: a one-rank group per process (every rank creates every group)."""
    mine = None
    for r in range(grid.world_size):
        g = new_group([r])
        if r == grid.rank:
            mine = g
    return mine


def build_pipeline(cfg: Config, grid: ProcessGrid, device: torch.device, tp: TPGroup | None) -> Pipeline:
    """This rank's chunks of the model (initialised as slices of the single-device model), the runner
    of the configured schedule, and the group for the tied embedding. Collective: every rank calls it."""
    p, m = cfg.parallel, cfg.model
    microbatches = cfg.train.global_batch // (cfg.train.micro_batch * p.dp)
    schedule = build_schedule(p.schedule, p.pp, microbatches, p.chunks)
    stages = stage_layers(m.layers, p.pp, p.chunks, p.layers_per_stage or None)
    chunks = []
    for c, layer_ids in enumerate(rank_chunk_layers(grid.pp_rank, p.pp, p.chunks, stages)):
        stage = virtual_stage(grid.pp_rank, c, p.pp)
        chunk = Transformer(m, layer_ids, first=stage == 0, last=stage == p.pp * p.chunks - 1)
        if tp is not None:
            parallelize_tensor(chunk, tp)
        init_model(chunk, cfg.train.seed)
        chunks.append(chunk.to(device))
    embed_group = _embedding_group(grid) if m.tied else None
    tied = [ch.embed.tok.weight for ch in chunks if ch.embed is not None]
    tied_copy = [ch.embed.tok.weight for ch in chunks if ch.embed is not None and not ch.first]
    seq = m.seq_len // tp.size if tp is not None and tp.sequence_parallel else m.seq_len
    link = StageLink(grid.pp_rank, p.pp, grid.ranks(Axis.PP), tp)
    runner = PipelineRunner(chunks, schedule, link, (cfg.train.micro_batch, seq, m.hidden), device,
                            strict_p2p=p.strict_p2p)
    return Pipeline(chunks, runner, embed_group, tied, tied_copy)


def _embedding_group(grid: ProcessGrid) -> dist.ProcessGroup | None:
    """First and last pipeline stage of this rank's pipeline. Every rank creates every such group."""
    mine = None
    for ranks in group_ranks(Axis.PP, grid.tp, grid.pp, grid.dp):
        group = new_group([ranks[0], ranks[-1]])
        if grid.rank in (ranks[0], ranks[-1]):
            mine = group
    return mine
