"""The parameter-efficient fine-tuning framework: freeze the base, dispatch to the method, and move the
method's parameters in and out of PEFT's format (the contract is in megaloom/tune/__init__.py).

The training stack never imports this module: the cli builds a `PeftHook` and passes it down as the
`adapt` callback (`build_parallel_model`, `setup_training`, `Trainer`), as it passes `weights`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from megaloom.config import SWITCHABLE_PEFT, Config
from megaloom.errors import ConfigError
from megaloom.model.init import _generator
from megaloom.parallel.comm import TPGroup
from megaloom.parallel.shard import ShardSpec
from megaloom.train.sharded_state import chunks_of

# peft.method -> the module that implements it (task C's methods live beside LoRA's)
MODULES = {"lora": "megaloom.tune.lora", "dora": "megaloom.tune.lora", "ia3": "megaloom.tune.ia3",
           "prefix": "megaloom.tune.prompt", "prompt": "megaloom.tune.prompt", "adapter": "megaloom.tune.adapter"}
# peft.method -> PEFT's peft_type in adapter_config.json
PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "ia3": "IA3", "prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING",
              "adapter": "BOTTLENECK"}


def method_module(cfg: Config) -> ModuleType:
    return importlib.import_module(MODULES[cfg.peft.method])


def merge_of(cfg: Config) -> Callable[[nn.Module], None]:
    """How a PEFT run's adapters fold into its single-process base: the method's `merge` (an NF4 base is
    dequantised first); a method whose parameters no base weight can absorb (prefix, prompt, Houlsby adapters)
    stops with one line."""
    merge = getattr(method_module(cfg), "merge", None)
    if merge is None:
        raise ConfigError(f"peft.method = '{cfg.peft.method}' adds parameters no base weight can absorb; export it "
                          "with --to peft and load it with PEFT")
    return merge


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
    place_local(param, spec.take(full) if spec is not None else full)


def place_local(param: nn.Parameter, value: torch.Tensor) -> None:
    """Fill `param` with `value`, the whole tensor-parallel shard it is a part of (ZeRO-2/3: its dp part)."""
    if hasattr(param, "device_mesh"):  # ZeRO-2/3: FSDP2 split the tp shard again over dp along dim 0
        value = value[dp_slices(param)]
        param = param.to_local()
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def dp_slices(param: torch.Tensor) -> tuple[slice, ...]:
    """Where a ZeRO-2/3 parameter's (a DTensor's) local part sits in its tensor-parallel shard."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def whole(t: torch.Tensor) -> torch.Tensor:
    """A ZeRO-2/3 parameter (a DTensor) gathered over dp into its tensor-parallel shard (collective over
    dp); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def apply_peft(chunk: nn.Module, cfg: Config, tp: TPGroup | None) -> None:
    """Freeze every base parameter of `chunk` and insert the trainable parameters of peft.method. Every
    forward (pre-)hook the method registers asks the chunk's `AdapterSwitch` (`adapters_off`)."""
    if cfg.peft.method == "none":
        return
    chunk.requires_grad_(False)
    device = next(chunk.parameters()).device
    switch = None
    if cfg.peft.method in SWITCHABLE_PEFT:  # not prefix and prompt tuning (their virtual tokens change the sequence)
        chunk.peft_switch = switch = AdapterSwitch()
    before = {id(m): (set(m._forward_hooks), set(m._forward_pre_hooks)) for m in chunk.modules()}
    method_module(cfg).apply(chunk, cfg, tp)
    for m in chunk.modules() if switch is not None else ():  # the method's hooks act only while the switch is on
        hooks, pre = before.get(id(m), (set(), set()))
        for key in set(m._forward_hooks) - hooks:
            m._forward_hooks[key] = _gated(m._forward_hooks[key], switch)
        for key in set(m._forward_pre_hooks) - pre:
            m._forward_pre_hooks[key] = _gated(m._forward_pre_hooks[key], switch)
    for p in chunk.parameters():
        if p.requires_grad:
            p.adapter = True  # still known after a frozen copy for inference (interop/load.py fill_model)
    chunk.to(device)


class AdapterSwitch:
    """Whether a chunk's adapters act (`on`). LoRA, DoRA and (IA)^3 act through forward hooks on the base
    linears, which `apply_peft` gates on it; Houlsby adapters read it themselves. Off, the chunk is its
    frozen base: the reference of DPO, GRPO and PPO without a second model (TRL's `disable_adapter`)."""

    def __init__(self) -> None:
        self.on = True


def _gated(hook: Callable, switch: AdapterSwitch) -> Callable:
    """`hook`, doing nothing while `switch` is off (a hook that returns None leaves the input or output)."""
    @functools.wraps(hook)
    def gated(*args):  # noqa: ANN002, ANN202 (a forward hook's or pre-hook's arguments)
        return hook(*args) if switch.on else None
    return gated


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Inside, `model` (the model or a ModuleList of this rank's pipeline chunks) runs as its frozen base:
    every chunk's adapters are switched off, on every pipeline stage and tensor-parallel rank alike (each
    rank switches its own chunks; no collective). Only for the methods of `SWITCHABLE_PEFT`: prefix and
    prompt tuning change the sequence the model sees, so they have no switch."""
    switches = [getattr(chunk, "peft_switch", None) for chunk in chunks_of(model)]
    if any(s is None for s in switches):
        raise ValueError("adapters_off needs a model whose adapters apply_peft inserted (peft.method lora, dora, "
                         "ia3 or adapter)")
    for s in switches:
        s.on = False
    try:
        yield
    finally:
        for s in switches:
            s.on = True


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
    (pretrained or checkpoint): every run quantizes the base (peft.quantize_base), then a fresh run
    initialises DoRA's magnitudes from the (dequantised) base and reads peft.init."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.record = base_fingerprint(cfg)
        self.tp: TPGroup | None = None  # the chunks' tp group: QLoRA quantizes the full weights

    def __call__(self, chunk: nn.Module, tp: TPGroup | None) -> None:
        self.tp = tp
        apply_peft(chunk, self.cfg, tp)

    @property
    def switchable(self) -> bool:
        """Whether the adapters can be switched off for a forward (`off`): not prefix or prompt tuning."""
        return self.cfg.peft.method in SWITCHABLE_PEFT

    def off(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """A context in which `model`, built with this hook, runs as its frozen base (`adapters_off`)."""
        return adapters_off(model)

    def check(self, saved: dict, ckpt: object) -> None:
        """A checkpoint's adapters were trained on this run's base (one line otherwise)."""
        check_base(saved, self.record, ckpt)

    def loaded(self, model: nn.Module, fresh: bool) -> str:
        """`model`: the model or a ModuleList of pipeline chunks. Returns what was done, for the console."""
        mod, said = method_module(self.cfg), []
        if self.cfg.peft.quantize_base == "nf4":  # first: QDoRA's magnitudes are the dequantised base's norms (PEFT)
            from megaloom.tune.qlora import quantize_base

            n = sum(quantize_base(chunk, self.tp) for chunk in chunks_of(model))
            said.append(f"{n} base linears in NF4")
        if fresh:
            ready = getattr(mod, "from_base", None)
            if ready is not None:  # DoRA: magnitudes = the base weights' norms
                for chunk in chunks_of(model):
                    ready(chunk, self.cfg)
            if self.cfg.peft.init:
                load_adapter(model, self.cfg, self.cfg.peft.init)
                said.append(f"adapters of {self.cfg.peft.init}")
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
