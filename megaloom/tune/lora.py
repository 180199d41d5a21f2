"""LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024) on megaloom's fused, tensor-parallel linears.

A LoRA site is one of a block's four linears (`attn.qkv`, `attn.proj`, `mlp.up`, `mlp.down`). The fused
ones keep one A/B pair per Hugging Face projection (q_proj, k_proj, v_proj; gate_proj, up_proj), each
adding to its own rows of the fused output, so adapters map one to one onto PEFT's. GPT-2's c_attn is
one Hugging Face module (one pair over all of [q; k; v]).

The update is added by a forward hook on the base linear, whose parameters keep their names:

    y = base(x) + s · B A dropout(x),      s = alpha / r   (alpha / sqrt(r) with rslora)

DoRA (PEFT's DoraLinearLayer): with m the magnitude vector and n = ||W + s·B A||_row, detached (DoRA §4.3),

    y = base(x) + (m / n - 1) · W dropout(x) + (m / n) · s · B A dropout(x)

Under ZeRO-2/3 the hook runs inside the block's FSDP2 forward, which has gathered W (and A, B, m) over
dp: n is computed from the whole (tp-local) rows, as without ZeRO.

Tensor parallelism splits A and B the way the base layer is split (Megatron-LM §2.3):
- column-parallel (qkv, up): A is replicated and applied to the layer's replicated input *before* the
  `f` operator, so `f`'s backward all-reduce gives every rank A's whole gradient (only r-wide
  activations cross ranks); B is split by output rows, per q/k/v (gate/up) block. m splits as B.
- row-parallel (proj, down): A is split by input columns and its r-wide partial sums go through `g`
  (all-reduce); B and m are replicated. DoRA's row norm is a sum of squares over the tp ranks.
With sequence parallelism the replicated A (column) and B (row) see part of the sequence; their
gradients are then summed over tp like the norms' (`parallel/tensor.py sync_replicated_grads`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megaloom.config import Config, ModelConfig
from megaloom.model.dropout import LayoutDropout
from megaloom.parallel.comm import TPGroup, enter_tp, leave_tp
from megaloom.parallel.shard import ShardSpec
from megaloom.tune.peft import place, place_local, seeded, whole

SITES = ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")
COLUMN = ("attn.qkv", "mlp.up")  # column-parallel under tp; the others are row-parallel
# PEFT's defaults when peft.targets is empty (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
LAYER_PREFIX = {"llama": "model.layers.{i}.", "gpt2": "transformer.h.{i}."}


@dataclass(frozen=True)
class Pair:
    """One A/B pair: the Hugging Face module (path inside a layer) whose update it is, the rows of the
    fused output it adds to (full model), and the tensor-parallel blocks of those rows."""

    hf: str  # e.g. "self_attn.q_proj"
    offset: int
    rows: int
    blocks: tuple[int, ...]

    @property
    def target(self) -> str:
        return self.hf.rsplit(".", 1)[-1]


def site_pairs(m: ModelConfig, site: str) -> list[Pair]:
    """Every Hugging Face projection of one site, whether targeted or not."""
    q, kv, h = m.heads * m.head_dim, m.n_kv_heads * m.head_dim, m.hidden
    if m.family == "gpt2":
        return {"attn.qkv": [Pair("attn.c_attn", 0, q + 2 * kv, (q, kv, kv))],
                "attn.proj": [Pair("attn.c_proj", 0, h, (h,))],
                "mlp.up": [Pair("mlp.c_fc", 0, m.ffn, (m.ffn,))],
                "mlp.down": [Pair("mlp.c_proj", 0, h, (h,))]}[site]
    return {"attn.qkv": [Pair("self_attn.q_proj", 0, q, (q,)), Pair("self_attn.k_proj", q, kv, (kv,)),
                         Pair("self_attn.v_proj", q + kv, kv, (kv,))],
            "attn.proj": [Pair("self_attn.o_proj", 0, h, (h,))],
            "mlp.up": [Pair("mlp.gate_proj", 0, m.ffn, (m.ffn,)), Pair("mlp.up_proj", m.ffn, m.ffn, (m.ffn,))],
            "mlp.down": [Pair("mlp.down_proj", 0, h, (h,))]}[site]


def family_targets(family: str) -> list[str]:
    """The Hugging Face module names a family's LoRA can target."""
    return ["c_attn", "c_proj", "c_fc"] if family == "gpt2" else [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def targets(cfg: Config) -> list[str]:
    return list(cfg.peft.targets) or DEFAULT_TARGETS[cfg.model.family]


def scaling(cfg: Config) -> float:
    p = cfg.peft
    return p.alpha / math.sqrt(p.rank) if p.rslora else p.alpha / p.rank


class FeatureDropout(LayoutDropout):
    """LayoutDropout whose input may also be split along the features (a row-parallel layer's input):
    the mask is drawn for the full activation and each rank keeps its slice, so masks do not depend on t."""

    def __init__(self, p: float, key: str):
        super().__init__(p, key)
        self.feat_rank, self.feat_size = 0, 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or self.feat_size == 1:
            return super().forward(x)
        digest = hashlib.blake2b(f"{torch.initial_seed()}/{self.key}/{self.mask_index()}".encode(),
                                 digest_size=8).digest()
        self.calls += 1
        gen = torch.Generator(device=x.device).manual_seed(int.from_bytes(digest, "little") >> 1)
        B, T, H = x.shape
        full = torch.rand((B, T, H * self.feat_size), generator=gen, device=x.device)
        keep = full[..., self.feat_rank * H:(self.feat_rank + 1) * H] >= self.p
        return x * keep / (1.0 - self.p)


class LoRAPair(nn.Module):
    """A (r, in) and B (out, r) of one projection, this rank's parts of them; DoRA's magnitude (out,)."""

    def __init__(self, r: int, in_f: int, out_f: int, dora: bool, dropout: FeatureDropout):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(r, in_f))
        self.B = nn.Parameter(torch.zeros(out_f, r))
        self.magnitude = nn.Parameter(torch.ones(out_f)) if dora else None
        self.drop = dropout


class LoRA(nn.Module):
    """The adapters of one site: a pair per targeted projection (`pairs`, keyed by target name), and
    where each one's rows sit in this rank's part of the output (`segments`)."""

    def __init__(self, cfg: Config, site: str, layer: int, in_f: int, tp: TPGroup | None):
        super().__init__()
        self.column = site in COLUMN
        self.tp = tp if tp is not None and tp.size > 1 else None
        t, rank = (self.tp.size, self.tp.rank) if self.tp else (1, 0)
        self.scale, self.dora = scaling(cfg), cfg.peft.method == "dora"
        wanted = set(targets(cfg))
        self.pairs = nn.ModuleDict()
        self.segments: list[tuple[str | None, int, int]] = []  # (pair key or None, local offset, local rows)
        local = 0
        r = cfg.peft.rank
        for pair in site_pairs(cfg.model, site):
            # this rank's rows of the pair, as the base layer splits them (ShardSpec: per block)
            rows = ShardSpec((pair.rows, r), 0, pair.blocks, rank, t).local_shape[0] if self.column else pair.rows
            key = pair.target if pair.target in wanted else None
            self.segments.append((key, local, rows))
            local += rows
            if key is None:
                continue
            drop = FeatureDropout(cfg.peft.dropout, f"layers.{layer}.{site}.lora.{key}.drop")
            if self.tp and not self.column:
                drop.feat_rank, drop.feat_size = rank, t
            elif self.tp:
                drop.set_sequence_shard(self.tp)
            mod = LoRAPair(r, in_f // t if (self.tp and not self.column) else in_f, rows, self.dora, drop)
            if self.tp and self.column:
                mod.B.shard_spec = ShardSpec((pair.rows, r), 0, pair.blocks, rank, t)
                if mod.magnitude is not None:
                    mod.magnitude.shard_spec = ShardSpec((pair.rows,), 0, pair.blocks, rank, t)
            elif self.tp:
                mod.A.shard_spec = ShardSpec((r, in_f), 1, (in_f,), rank, t)
            self.pairs[key] = mod
        self.width = local

    def delta(self, x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """What the adapters add to the base layer's output `out` for its input `x`."""
        parts = []
        for key, offset, rows in self.segments:
            if key is None:
                parts.append(out.new_zeros(*out.shape[:-1], rows))
                continue
            pair = self.pairs[key]
            xd = pair.drop(x)
            h = F.linear(xd.to(pair.A.dtype), pair.A)
            h = (enter_tp(h, self.tp) if self.column else leave_tp(h, self.tp)) if self.tp else h
            lora = F.linear(h, pair.B) * self.scale
            if pair.magnitude is None:
                parts.append(lora)
                continue
            w = _dense(weight, lora.dtype)
            w = w[offset:offset + rows] if self.column else w
            norm = self.weight_norm(w, pair.A, pair.B).detach()  # DoRA §4.3: a constant for the gradient
            mag = (pair.magnitude / norm).view(*([1] * (out.dim() - 1)), -1)
            xb = enter_tp(xd, self.tp) if (self.tp and self.column) else xd
            base = F.linear(xb.to(w.dtype), w)
            if self.tp and not self.column:
                base = leave_tp(base, self.tp)
            parts.append((mag - 1) * base + mag * lora)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def weight_norm(self, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """||W + s·B A|| per output row; the row-parallel W's columns are spread over the tp ranks."""
        full = w + self.scale * (b @ a).detach().to(w.dtype)
        if self.tp and not self.column:
            sq = full.float().pow(2).sum(dim=1)
            dist.all_reduce(sq, group=self.tp.group)
            return sq.sqrt().to(w.dtype)
        return torch.linalg.norm(full, dim=1)


def _dense(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a plain tensor: an NF4 weight (QLoRA) dequantised to `dtype`, as PEFT's
    dequantize_module_weight does."""
    return w.to(dtype) if hasattr(w, "get_original_weight") else w


def _dense_whole(w: torch.Tensor) -> torch.Tensor:
    """The base weight's tp shard in fp32 (ZeRO-2/3: gathered over dp, a collective), an NF4 weight
    (QLoRA) dequantised: each dp rank dequantises its own NF4 rows and the plain values are gathered."""
    local = w.to_local() if hasattr(w, "to_local") else w
    if hasattr(w, "device_mesh") and hasattr(local, "get_original_weight"):
        from torch.distributed.tensor import DTensor

        w = DTensor.from_local(_dense(local, torch.float32), w.device_mesh, w.placements, run_check=False,
                               shape=w.shape, stride=w.stride())
    return _dense(whole(w), torch.float32).float()


def _hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out + module.lora.delta(args[0], out, module.weight).to(out.dtype)


def _site(block: nn.Module, site: str) -> nn.Module:
    owner, attr = site.split(".")
    return getattr(getattr(block, owner), attr)


def block_linears(chunk: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """(layer index, site, base linear) of every block linear of `chunk` an adapter may wrap."""
    for i, block in chunk.layers.items():
        for site in SITES:
            yield i, site, _site(block, site)


def adapted(chunk: nn.Module, kind: str) -> Iterator[tuple[str, str, nn.Module, nn.Module]]:
    """(layer index, site, base linear, adapter) of every block linear carrying a `kind` adapter
    ("lora" for LoRA/DoRA, "ia3")."""
    for i, site, linear in block_linears(chunk):
        adapter = getattr(linear, kind, None)
        if adapter is not None:
            yield i, site, linear, adapter


def apply(chunk: nn.Module, cfg: Config, tp: TPGroup | None) -> None:
    """Insert the LoRA/DoRA pairs of peft.targets into every block of `chunk`, initialised as PEFT does
    (A Kaiming-uniform: U(±1/sqrt(in)); B zero; DoRA's m is set from the base by `from_base`), each
    full A drawn from (train.seed, its name)."""
    wanted = set(targets(cfg))
    for i, site, linear in block_linears(chunk):
        if not any(p.target in wanted for p in site_pairs(cfg.model, site)):
            continue
        in_f = linear.weight.shape[1] * (tp.size if tp is not None and tp.size > 1 and site not in COLUMN else 1)
        linear.lora = LoRA(cfg, site, int(i), in_f, tp)
        for key, pair in linear.lora.pairs.items():
            name = f"layers.{i}.{site}.lora.pairs.{key}.A"
            place(pair.A, seeded(cfg.train.seed, name, (cfg.peft.rank, in_f), "uniform", 1 / math.sqrt(in_f)))
        linear.register_forward_hook(_hook)


@torch.no_grad()
def from_base(chunk: nn.Module, cfg: Config) -> None:
    """DoRA: each magnitude vector starts as the row norms of W + s·B A (PEFT's update_layer), read
    from the base once it holds its final (pretrained) weights; W dequantised when the base is NF4
    (QDoRA: `PeftHook.loaded` quantizes first, as PEFT reads a 4-bit base's dequantised weight). Under
    ZeRO-2/3 the base weight, A and B are gathered over dp first (this rank's tp shard of each, as the
    forward sees them), and each rank keeps its dp part of the norms; every rank runs the same gathers
    in the same order."""
    if cfg.peft.method != "dora":
        return
    for _, _, linear, lora in adapted(chunk, "lora"):
        weight = _dense_whole(linear.weight)
        for key, offset, rows in lora.segments:
            if key is None:
                continue
            pair = lora.pairs[key]
            w = weight[offset:offset + rows] if lora.column else weight
            place_local(pair.magnitude, lora.weight_norm(w, whole(pair.A), whole(pair.B)))


def peft_names(chunk: nn.Module) -> dict[str, tuple[str, ShardSpec | None]]:
    cfg_family = chunk.cfg.family
    out = {}
    for i, site, _, lora in adapted(chunk, "lora"):
        prefix = "base_model.model." + LAYER_PREFIX[cfg_family].format(i=i)
        hf = {p.target: p.hf for p in site_pairs(chunk.cfg, site)}
        for key, pair in lora.pairs.items():
            base = f"layers.{i}.{site}.lora.pairs.{key}"
            out[f"{base}.A"] = (f"{prefix}{hf[key]}.lora_A.weight", getattr(pair.A, "shard_spec", None))
            out[f"{base}.B"] = (f"{prefix}{hf[key]}.lora_B.weight", getattr(pair.B, "shard_spec", None))
            if pair.magnitude is not None:
                out[f"{base}.magnitude"] = (f"{prefix}{hf[key]}.lora_magnitude_vector",
                                            getattr(pair.magnitude, "shard_spec", None))
    return out


def peft_config(cfg: Config) -> dict:
    p = cfg.peft
    return {"r": p.rank, "lora_alpha": p.alpha, "lora_dropout": p.dropout, "use_rslora": p.rslora,
            "use_dora": p.method == "dora", "target_modules": sorted(targets(cfg)), "bias": "none",
            "fan_in_fan_out": cfg.model.family == "gpt2", "init_lora_weights": True, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}


@torch.no_grad()
def merge(chunk: nn.Module) -> None:
    """Fold every adapter into its base weight and remove it (single process: `--to hf --merge`):
    W += s·B A (LoRA); W = m / ||W + s·B A|| · (W + s·B A) (DoRA, PEFT's merge). An NF4 base (QLoRA) is
    dequantised first (all of it, adapted or not): the merged weights are those the run computed with."""
    from megaloom.tune.qlora import dequantize_base

    dequantize_base(chunk)
    for _, _, linear, lora in list(adapted(chunk, "lora")):  # a list: each adapter is removed as it merges
        if lora.tp is not None:
            raise ValueError("merging LoRA needs the single-process model (tp = 1)")
        for key, offset, rows in lora.segments:
            if key is None:
                continue
            pair = lora.pairs[key]
            w = linear.weight[offset:offset + rows]
            new = w + lora.scale * (pair.B @ pair.A)
            if pair.magnitude is not None:
                new = (pair.magnitude / torch.linalg.norm(new, dim=1)).unsqueeze(1) * new
            w.copy_(new)
        del linear.lora
        linear._forward_hooks.clear()
