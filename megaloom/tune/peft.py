"""The parameter-efficient fine-tuning framework: freeze the base, dispatch to the method, and move the
method's parameters in and out of PEFT's format (the contract is in megaloom/tune/__init__.py).

The training stack never imports this module: the cli builds a `PeftHook` and passes it down as the
`adapt` callback (`build_parallel_model`, `setup_training`, `Trainer`), as it passes `weights`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from megaloom.config import Config
from megaloom.errors import ConfigError
from megaloom.model.init import _generator
from megaloom.parallel.comm import TPGroup
from megaloom.parallel.shard import ShardSpec

# peft.method -> the module that implements it (task C's methods live beside LoRA's)
MODULES = {"lora": "megaloom.tune.lora", "dora": "megaloom.tune.lora", "ia3": "megaloom.tune.ia3",
           "prefix": "megaloom.tune.prompt", "prompt": "megaloom.tune.prompt", "adapter": "megaloom.tune.adapter"}
# peft.method -> PEFT's peft_type in adapter_config.json
PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "ia3": "IA3", "prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING",
              "adapter": "BOTTLENECK"}


def method_module(cfg: Config) -> ModuleType:
    return importlib.import_module(MODULES[cfg.peft.method])


def seeded(seed: int, name: str, shape: tuple[int, ...], kind: str = "normal", scale: float = 1.0) -> torch.Tensor:
    """The full fp32 initial value of an adapter parameter: drawn from its own generator, seeded by
    (seed, canonical name), so every layout holds slices of the same tensor (as `model/init.py`).
    kind: normal (std `scale`), uniform (in [-scale, scale]), zeros, ones."""
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "ones":
        return torch.ones(shape)
    gen = _generator(seed, f"peft/{name}")
    if kind == "uniform":
        return (torch.rand(shape, generator=gen) * 2 - 1) * scale
    return torch.randn(shape, generator=gen) * scale


def place(param: nn.Parameter, full: torch.Tensor) -> None:
    """Fill `param` with its part (its `shard_spec`, if any) of the full tensor `full`."""
    spec: ShardSpec | None = getattr(param, "shard_spec", None)
    value = spec.take(full) if spec is not None else full
    if hasattr(param, "device_mesh"):  # ZeRO-2/3: FSDP2 split the tp shard again over dp along dim 0
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        value = value[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
        param = param.to_local()
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def apply_peft(chunk: nn.Module, cfg: Config, tp: TPGroup | None) -> None:
    """Freeze every base parameter of `chunk` and insert the trainable parameters of peft.method."""
    if cfg.peft.method == "none":
        return
    chunk.requires_grad_(False)
    device = next(chunk.parameters()).device
    method_module(cfg).apply(chunk, cfg, tp)
    for p in chunk.parameters():
        if p.requires_grad:
            p.adapter = True  # still known after a frozen copy for inference (interop/load.py fill_model)
    chunk.to(device)


def chunks_of(model: nn.Module) -> list[nn.Module]:
    model = getattr(model, "_orig_mod", model)
    return list(model) if isinstance(model, nn.ModuleList) else [model]


def peft_names(model: nn.Module, cfg: Config) -> dict[str, tuple[str, ShardSpec | None]]:
    """Every method parameter this rank holds (over its pipeline chunks) -> (PEFT key, shard spec)."""
    mod = method_module(cfg)
    out: dict[str, tuple[str, ShardSpec | None]] = {}
    for chunk in chunks_of(model):
        out.update(mod.peft_names(chunk))
    return out


def to_peft(cfg: Config, name: str, full: torch.Tensor) -> torch.Tensor:
    fn = getattr(method_module(cfg), "to_peft", None)
    return fn(name, full) if fn is not None else full


def from_peft(cfg: Config, name: str, tensor: torch.Tensor) -> torch.Tensor:
    fn = getattr(method_module(cfg), "from_peft", None)
    return fn(name, tensor, cfg) if fn is not None else tensor


# ------------------------------------------------------------------------------------------ the base


def base_fingerprint(cfg: Config) -> dict:
    """Which base model adapters need: model.pretrained (path, tensor count and sizes, a hash of a few
    tensors' first values) or, without one, the seed that initialised it; and the model.* sizes."""
    m = cfg.model
    record: dict = {"family": m.family, "layers": m.layers, "hidden": m.hidden, "heads": m.heads,
                    "kv_heads": m.n_kv_heads, "ffn": m.ffn, "vocab_size": m.vocab_size}
    if not m.pretrained:
        record["seed"] = cfg.train.seed
        return record
    from megaloom.interop.sources import open_source  # the file reader; only for a pretrained base

    record["pretrained"] = str(m.pretrained)
    source = open_source(m.pretrained, m.heads, m.n_kv_heads, lambda n: n)
    shapes = source.shapes()
    digest = hashlib.blake2b(digest_size=8)
    for name in sorted(shapes)[:4]:  # a few tensors, their first 1,024 values: cheap and telling
        t = source.read(name, (slice(0, 1),) if len(shapes[name]) > 1 else (slice(0, min(1024, shapes[name][0])),))
        digest.update(name.encode())
        digest.update(t.float().reshape(-1)[:1024].numpy().tobytes())
    source.release()
    record["tensors"] = len(shapes)
    record["elements"] = sum(int(torch.tensor(s).prod()) for s in shapes.values())
    record["hash"] = digest.hexdigest()
    return record


def check_base(saved: dict, now: dict, ckpt: object) -> None:
    """One line when a checkpoint's adapters were trained on another base than this run's."""
    diff = sorted(k for k in set(saved) | set(now) if k != "pretrained" and saved.get(k) != now.get(k))
    if diff:
        k = diff[0]
        where = saved.get("pretrained") or f"the random base of train.seed = {saved.get('seed')}"
        raise ConfigError(f"checkpoint {ckpt} holds adapters of another base model: {k} is {saved.get(k)!r} there "
                          f"but {now.get(k)!r} here; set model.pretrained (and model.*) to its base ({where})")


# ----------------------------------------------------------------------------------- the callback


class PeftHook:
    """What the cli hands the training stack for a PEFT run (`adapt=`): called on every model chunk
    before ZeRO wrapping (`apply_peft`); `loaded` runs once the base holds its final weights
    (pretrained or checkpoint): a fresh run then reads peft.init, initialises DoRA's magnitudes from
    the base, and every run quantizes the base (peft.quantize_base)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.record = base_fingerprint(cfg)

    def __call__(self, chunk: nn.Module, tp: TPGroup | None) -> None:
        apply_peft(chunk, self.cfg, tp)

    def check(self, saved: dict, ckpt: object) -> None:
        """A checkpoint's adapters were trained on this run's base (one line otherwise)."""
        check_base(saved, self.record, ckpt)

    def loaded(self, model: nn.Module, fresh: bool) -> str:
        """`model`: the model or a ModuleList of pipeline chunks. Returns what was done, for the console."""
        mod, said = method_module(self.cfg), []
        if fresh:
            ready = getattr(mod, "from_base", None)
            if ready is not None:  # DoRA: magnitudes = the base weights' norms
                for chunk in chunks_of(model):
                    ready(chunk, self.cfg)
            if self.cfg.peft.init:
                load_adapter(model, self.cfg, self.cfg.peft.init)
                said.append(f"adapters of {self.cfg.peft.init}")
        if self.cfg.peft.quantize_base == "nf4":
            from megaloom.tune.qlora import quantize_base

            n = sum(quantize_base(chunk) for chunk in chunks_of(model))
            said.append(f"{n} base linears in NF4")
        return ", ".join(said)


# --------------------------------------------------------------------------------------- PEFT files


def adapter_config(cfg: Config, base: str) -> dict:
    """adapter_config.json as PEFT writes it for this run's method."""
    mod = method_module(cfg)
    out = {"peft_type": PEFT_TYPES[cfg.peft.method], "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
           "inference_mode": True, "revision": None}
    out.update(mod.peft_config(cfg))
    return out


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the tensors of adapter_model.safetensors (or adapter_model.bin)."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / "adapter_config.json").is_file():
        raise ConfigError(f"peft.init = '{directory}' holds no adapter_config.json; pass a directory PEFT's "
                          "save_pretrained wrote")
    config = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
    if (d / "adapter_model.safetensors").is_file():
        tensors = load_file(str(d / "adapter_model.safetensors"))
    else:
        tensors = torch.load(d / "adapter_model.bin", map_location="cpu", weights_only=True)
    return config, tensors


@torch.no_grad()
def load_adapter(model: nn.Module, cfg: Config, directory: str | Path) -> None:
    """peft.init: this rank's parts of a PEFT adapter's tensors into the method's parameters. The
    adapter's method, rank and targets must be the run's (`megaloom.config` checks it when loading)."""
    config, tensors = read_adapter(directory)
    params = {name: p for chunk in chunks_of(model) for name, p in chunk.named_parameters()}
    for name, (key, spec) in peft_names(model, cfg).items():
        found = tensors.get(key)
        if found is None:
            raise ConfigError(f"peft.init = '{directory}' lacks {key}; its adapter_config.json must match peft.* "
                              f"(method, rank, targets): it has r={config.get('r')}, "
                              f"target_modules={config.get('target_modules')}")
        full = from_peft(cfg, name, found.float())
        want = spec.full_shape if spec is not None else tuple(params[name].shape)
        if tuple(full.shape) != tuple(want):
            raise ConfigError(f"peft.init = '{directory}': {key} has shape {tuple(full.shape)} there but {tuple(want)} "
                              "here; set peft.rank and model.* to the adapter's")
        place(params[name], full)
