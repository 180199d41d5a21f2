"""(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): learned vectors that rescale activations, with PEFT's semantics (peft/tuners/ia3).

A targeted Hugging Face projection gets one vector, initialised to ones (the model is unchanged at start):
- an attention or MLP projection scales its *output* rows: y = l ⊙ (W x + b) (k_proj, v_proj, ...; GPT-2's
  fused c_attn has one vector over all of [q; k; v], as in PEFT);
- a feed-forward module (PEFT's `feedforward_modules`: down_proj; GPT-2's mlp.c_proj) scales its *input*:
  y = W (l ⊙ x) + b.
PEFT's defaults per family: llama k_proj v_proj down_proj (Qwen2, model.qkv_bias: q_proj v_proj
down_proj), gpt2 c_attn mlp.c_proj.

megaloom's fused linears (`attn.qkv` rows [q; k; v], `mlp.up` rows [gate; up]) multiply each projection's
rows by its vector (ones where a projection is not targeted), through a forward hook on the base linear
whose parameters keep their names. Tensor parallelism: an output vector of a column-parallel layer is
split like that layer's output rows (per q/k/v block); the input vector of the row-parallel down
projection like its input columns; the output vector of the row-parallel attention projection (o_proj) is
replicated and applied after the reduction (its gradient is summed over tp under sequence parallelism,
as the norms').
"""

from __future__ import annotations

import torch
from torch import nn

from megaloom.config import Config
from megaloom.parallel.comm import TPGroup
from megaloom.parallel.shard import ShardSpec
from megaloom.tune.lora import COLUMN, LAYER_PREFIX, SITES, adapted, block_linears, site_pairs
from megaloom.tune.peft import place, seeded

# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING
DEFAULT_TARGETS = {"llama": ["k_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"],
                   "gpt2": ["c_attn", "mlp.c_proj"]}
FEEDFORWARD = {"llama": "mlp.down_proj", "gpt2": "mlp.c_proj"}


def _family(cfg: Config) -> str:
    return "qwen2" if cfg.model.family == "llama" and cfg.model.qkv_bias else cfg.model.family


def targets(cfg: Config) -> list[str]:
    """The Hugging Face modules adapted, each a full path inside a layer (attn.c_attn, self_attn.k_proj,
    mlp.c_proj, ...). A name matches the paths it ends with, as in PEFT: GPT-2's "c_proj" is both the
    attention's and the MLP's."""
    names = list(cfg.peft.targets) or DEFAULT_TARGETS[_family(cfg)]
    paths = [p.hf for site in SITES for p in site_pairs(cfg.model, site)]
    return [p for p in paths if any(p == n or p.endswith("." + n) for n in names)]


class IA3(nn.Module):
    """The vectors of one site: `scales[target]` (PEFT's shapes: (rows, 1) for an output, (1, in) for
    a feed-forward input), this rank's parts of them; `segments` say where each output vector's rows sit
    in this rank's part of the output (None: not targeted, scale 1)."""

    def __init__(self, cfg: Config, site: str, linear: nn.Module, tp: TPGroup | None):
        super().__init__()
        t, rank = (tp.size, tp.rank) if tp is not None and tp.size > 1 else (1, 0)
        wanted = set(targets(cfg))
        self.scales = nn.ParameterDict()
        self.segments: list[tuple[str | None, int]] = []  # (target or None, local rows)
        self.feedforward = False
        for pair in site_pairs(cfg.model, site):
            if pair.hf == FEEDFORWARD[cfg.model.family]:  # PEFT's feedforward module: scales the input
                self.feedforward = pair.hf in wanted
                if self.feedforward:
                    local_in = linear.weight.shape[1]
                    p = nn.Parameter(torch.ones(1, local_in))
                    if t > 1:
                        p.shard_spec = ShardSpec((1, local_in * t), 1, (local_in * t,), rank, t)
                    self.scales[pair.target] = p
                continue
            column = site in COLUMN and t > 1
            rows = pair.rows // t if column else pair.rows
            key = pair.target if pair.hf in wanted else None
            self.segments.append((key, rows))
            if key is not None:
                p = nn.Parameter(torch.ones(rows, 1))
                if column:
                    p.shard_spec = ShardSpec((pair.rows, 1), 0, pair.blocks, rank, t)
                self.scales[key] = p

    def output_scale(self, like: torch.Tensor) -> torch.Tensor | None:
        """The vector over this rank's output features (ones where no projection is targeted)."""
        if not any(key for key, _ in self.segments):
            return None
        parts = [self.scales[key].flatten() if key else like.new_ones(rows, dtype=torch.float32)
                 for key, rows in self.segments]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _scale_input(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    (scale,) = module.ia3.scales.values()
    return ((x.to(scale.dtype) * scale.flatten()).to(x.dtype), *args[1:])


def _scale_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    scale = module.ia3.output_scale(out)
    return out if scale is None else (out * scale).to(out.dtype)


def apply(chunk: nn.Module, cfg: Config, tp: TPGroup | None) -> None:
    """Insert the (IA)³ vectors of peft.targets into every block of `chunk`, all ones (PEFT's
    init_ia3_weights); each drawn through `seeded` like every method's parameters."""
    for i, site, linear in block_linears(chunk):
        ia3 = IA3(cfg, site, linear, tp)
        if not len(ia3.scales):
            continue
        linear.ia3 = ia3
        for key, p in ia3.scales.items():
            full = p.shard_spec.full_shape if hasattr(p, "shard_spec") else tuple(p.shape)
            place(p, seeded(cfg.train.seed, f"layers.{i}.{site}.ia3.scales.{key}", full, "ones"))
        if ia3.feedforward:
            linear.register_forward_pre_hook(_scale_input)
        if ia3.segments and any(k for k, _ in ia3.segments):
            linear.register_forward_hook(_scale_output)


def peft_names(chunk: nn.Module) -> dict[str, tuple[str, ShardSpec | None]]:
    """layers.{i}.{site}.ia3.scales.{target} -> base_model.model.<layer>.<module>.ia3_l."""
    out = {}
    for i, site, _, ia3 in adapted(chunk, "ia3"):
        prefix = "base_model.model." + LAYER_PREFIX[chunk.cfg.family].format(i=i)
        hf = {p.target: p.hf for p in site_pairs(chunk.cfg, site)}
        for key, p in ia3.scales.items():
            out[f"layers.{i}.{site}.ia3.scales.{key}"] = (f"{prefix}{hf[key]}.ia3_l", getattr(p, "shard_spec", None))
    return out


def peft_names_of_targets(cfg: Config) -> tuple[list[str], list[str]]:
    """target_modules and feedforward_modules as adapter_config.json lists them: module names, GPT-2's
    c_proj qualified (attn.c_proj, mlp.c_proj: one scales its output, the other its input, and PEFT wants
    feedforward_modules to be a subset of target_modules)."""
    names = sorted(p if p.endswith(".c_proj") else p.rsplit(".", 1)[-1] for p in targets(cfg))
    ff = [n for n in names if FEEDFORWARD[cfg.model.family].endswith(n)]
    return names, ff


def peft_config(cfg: Config) -> dict:
    """adapter_config.json's IA3 keys."""
    names, ff = peft_names_of_targets(cfg)
    return {"target_modules": names, "feedforward_modules": ff, "fan_in_fan_out": cfg.model.family == "gpt2",
            "init_ia3_weights": True, "modules_to_save": None, "exclude_modules": None}


@torch.no_grad()
def merge(chunk: nn.Module) -> None:
    """Fold every vector into its base weight (PEFT's merge): output rows of W and b scaled by l, or the
    input columns of W (feed-forward); then remove the vectors and hooks. Any layout: each rank scales
    its own shard by its own part of the vector."""
    for _, _, linear, ia3 in list(adapted(chunk, "ia3")):  # a list: each vector is removed as it merges
        if ia3.feedforward:
            (scale,) = ia3.scales.values()
            linear.weight.mul_(scale.to(linear.weight.dtype))
        else:
            scale = ia3.output_scale(linear.weight)
            linear.weight.mul_(scale.unsqueeze(1).to(linear.weight.dtype))
            if linear.bias is not None:
                linear.bias.mul_(scale.to(linear.bias.dtype))
        del linear.ia3
        linear._forward_hooks.clear()
        linear._forward_pre_hooks.clear()
