"""`megaloom quantize` and `megaloom prune`: load MODEL in one process, compress the linears of its
transformer blocks, write a checkpoint directory (store.py) and say what it holds."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from megaloom.compress.hessian import blockwise, calibration_windows
from megaloom.compress.prune import Sparsity, magnitude_mask, sparsegpt, wanda_mask
from megaloom.compress.quantize import LINEARS, block_linears, check_scheme, quantize_model
from megaloom.compress.schemes import Method, QuantScheme
from megaloom.config import Config, PeftConfig
from megaloom.errors import ConfigError

HIGH_PRECISION = ("embedding", "head")


def add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", nargs="+", metavar="FILE", help="calibration text: text files (one document each) or "
                                                               ".jsonl files (one \"text\" per line)")
    p.add_argument("--calib-samples", type=int, default=128, metavar="N", help="calibration windows (default 128)")
    p.add_argument("--calib-length", type=int, default=512, metavar="L",
                   help="tokens per calibration window (default 512, at most model.seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass (default 8)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ / SparseGPT dampening, a fraction of the mean "
                                                            "diagonal of X^T X (default 0.01, the papers')")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows' offsets")


def _check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"'{out}' exists and is not empty; pass a new directory for the compressed model")


def _windows(args: argparse.Namespace, tokenizer, cfg, method: str) -> torch.Tensor:  # noqa: ANN001
    if not args.calib:
        raise ConfigError(f"--method {method} needs calibration text: add --calib FILE [FILE ...] "
                          "(e.g. a few hundred KB of text like what the model will see)")
    if args.calib_length > cfg.model.seq_len:
        raise ConfigError(f"--calib-length {args.calib_length} exceeds the model's context (model.seq_len = "
                          f"{cfg.model.seq_len}); pass at most {cfg.model.seq_len}")
    return calibration_windows(tokenizer, args.calib, args.calib_samples, args.calib_length, args.seed)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and "tokenizer" not in f.parts)


def _load(model_path: str):  # noqa: ANN202
    from megaloom.interop.load import load_model

    if not Path(model_path).exists():
        raise FileNotFoundError(f"MODEL '{model_path}' does not exist; pass a run directory, a checkpoint, "
                                "a Hugging Face model directory or a .gguf file")
    return load_model(model_path)


def _say(msg: str) -> None:
    print(f"    {msg}", flush=True)


# ------------------------------------------------------------------------------------------ quantize


def quantize_command(args: argparse.Namespace,
                     merge_of: Callable[[Config], Callable[[nn.Module], None]] | None = None) -> int:
    """`merge_of(cfg)(model)` folds a PEFT run's adapters into its base (`megaloom.tune.peft.merge_of`, handed in
    by the cli: tune sits beside compress, not below it): what is quantized is the model the run computes with,
    and the config written beside it has no [peft] any more."""
    from megaloom.compress.gptq import gptq, int4_tensor
    from megaloom.compress.store import save_quantized

    if not args.from_qat and not args.method:
        raise ConfigError("--method is required (int8-weight, int8-dynamic, int4-weight, int8-dynamic-act-int4-weight "
                          "or gptq), unless MODEL is a [qat] run converted with --from-qat")
    scheme = None if args.from_qat else QuantScheme.parse(args.method, args.group_size)
    keep = [k.strip() for k in args.keep_high_precision.split(",") if k.strip()]
    unknown = sorted(set(keep) - set(HIGH_PRECISION))
    if unknown:
        raise ConfigError(f"--keep-high-precision {args.keep_high_precision}: '{unknown[0]}' is not one of "
                          f"{', '.join(HIGH_PRECISION)}")
    if set(keep) != set(HIGH_PRECISION):
        raise ConfigError(f"--keep-high-precision {args.keep_high_precision}: quantizing the embedding or the head "
                          "is not supported yet; pass --keep-high-precision embedding,head")
    out = Path(args.output)
    _check_out(out)
    if args.from_qat:
        model, tokenizer, cfg, scheme, qat = _qat_model(args, merge_of)
    else:
        model, tokenizer, cfg = _load(args.model)
        _merge_peft(model, cfg, merge_of)
        qat = None
    check_scheme(model, scheme)
    start = time.perf_counter()
    calib = None
    if scheme.method is Method.GPTQ:
        windows = _windows(args, tokenizer, cfg, args.method)
        calib = {"files": args.calib, "samples": args.calib_samples, "length": args.calib_length, "seed": args.seed,
                 "damp": args.damp}

        def visit(layer: int, block: nn.Module, grams: dict[str, torch.Tensor]) -> None:
            for path in LINEARS:
                m = block.get_submodule(path)
                q, s, z = gptq(m.weight.detach(), grams[path], scheme.group_size, damp=args.damp)
                m.weight = nn.Parameter(int4_tensor(q, s, z, scheme.group_size, m.weight.dtype), requires_grad=False)

        blockwise(model, windows, visit, args.batch_size, _say)
        names = [lin.name for lin in block_linears(model)]
    else:
        names = quantize_model(model, scheme)
    seconds = time.perf_counter() - start
    full = [n for n, p in model.named_parameters() if not hasattr(p, "qdata")]
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    record = {**scheme.record(), "source": str(args.model), "high_precision": full, "calibration": calib,
              "torchao_config": type(scheme.torchao_config()).__name__, "from_qat": qat}
    save_quantized(model, cfg, tokenizer, out, record)
    size = dir_bytes(out)
    print(f"wrote {out}: {len(names)} linears quantized ({scheme.method.value}"
          f"{f', group size {scheme.group_size}' if scheme.group_size else ', one scale per row'}) in {seconds:.1f} s; "
          f"{size / 1e6:.1f} MB on disk (the fp32 parameters: {fp32_bytes / 1e6:.1f} MB)")
    print(f"high precision: {len(full)} tensors ({', '.join(_summarise(full))})")
    return 0


def _merge_peft(model: nn.Module, cfg: Config, merge_of: Callable | None) -> bool:
    """A PEFT run's adapters folded into its base, and [peft] taken out of its config; whether there were any."""
    if cfg.peft.method == "none":
        return False
    if merge_of is None:
        raise ValueError(f"compressing a peft.method = '{cfg.peft.method}' run needs merge_of (megaloom.tune.peft)")
    merge_of(cfg)(model)
    cfg.peft = PeftConfig()
    return True


def _qat_model(args: argparse.Namespace, merge_of: Callable | None):  # noqa: ANN202
    """`--from-qat`: the run's model in one process with its PEFT adapters merged into the base (W + s B A,
    what the fake-quantized forward's weights become), the run's [qat] scheme (a --method or --group-size
    given too must be the run's), and what to record; the config written beside the quantized model has
    neither [peft] nor [qat] any more (the adapters are in the weights, the weights are quantized)."""
    from megaloom.compress.qat import qat_scheme
    from megaloom.config import QATConfig

    model, tokenizer, cfg = _load(args.model)
    if cfg.qat.scheme == "none":
        raise ConfigError(f"--from-qat: '{args.model}' was not trained with quantization-aware training (its config "
                          "has qat.scheme = \"none\"); quantize it with --method instead")
    scheme = qat_scheme(cfg)
    if (args.method and args.method != scheme.method.value) or (args.group_size and args.group_size != scheme.group_size):
        raise ConfigError(f"--from-qat: '{args.model}' trained with qat.scheme = \"{scheme.method.value}\", group size "
                          f"{scheme.group_size}; leave --method and --group-size out (or give those)")
    merged = _merge_peft(model, cfg, merge_of)
    record = {"scheme": scheme.method.value, "group_size": scheme.group_size, "lora_merged": merged}
    cfg.qat = QATConfig()
    return model, tokenizer, cfg, scheme, record


def _summarise(names: list[str]) -> list[str]:
    """embed.tok.weight, head.weight, norm.weight, and '<n> norm weights' style counts for the layers."""
    top = [n for n in names if not n.startswith("layers.")]
    per_layer: dict[str, int] = {}
    for n in names:
        if n.startswith("layers."):
            key = n.split(".", 2)[2]
            per_layer[key] = per_layer.get(key, 0) + 1
    return top + [f"{k} x{v}" for k, v in per_layer.items()]


# --------------------------------------------------------------------------------------------- prune


def prune_command(args: argparse.Namespace,
                  merge_of: Callable[[Config], Callable[[nn.Module], None]] | None = None) -> int:
    """`merge_of`: as for `quantize_command`, a PEFT run's adapters are folded into its base first."""
    from megaloom.compress.store import save_pruned

    sparsity = Sparsity.parse(args.sparsity, args.pattern)
    out = Path(args.output)
    _check_out(out)
    model, tokenizer, cfg = _load(args.model)
    _merge_peft(model, cfg, merge_of)
    for lin in block_linears(model):
        sparsity.check(lin.name, lin.in_features)
    start = time.perf_counter()
    masks: dict[str, torch.Tensor] = {}
    calib = None
    if args.method == "magnitude":
        with torch.no_grad():
            for lin in block_linears(model):
                mask = magnitude_mask(lin.module.weight, sparsity)
                lin.module.weight.mul_(mask)
                masks[lin.name] = mask
    else:
        windows = _windows(args, tokenizer, cfg, args.method)
        calib = {"files": args.calib, "samples": args.calib_samples, "length": args.calib_length, "seed": args.seed}

        def visit(layer: int, block: nn.Module, grams: dict[str, torch.Tensor]) -> None:
            for path in LINEARS:
                w = block.get_submodule(path).weight
                if args.method == "wanda":
                    mask = wanda_mask(w, grams[path], sparsity)
                    w.mul_(mask)
                else:
                    new, mask = sparsegpt(w, grams[path], sparsity, damp=args.damp)
                    w.copy_(new)
                masks[f"layers.{layer}.{path}.weight"] = mask

        blockwise(model, windows, visit, args.batch_size, _say, diagonal=args.method == "wanda")
    seconds = time.perf_counter() - start
    zeros = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    everything = sum(p.numel() for p in model.parameters())
    record = {"method": args.method, "pattern": sparsity.describe(), "fraction": sparsity.fraction,
              "source": str(args.model), "calibration": calib, "layers": sorted(masks)}
    save_pruned(model, cfg, tokenizer, out, masks, record)
    print(f"wrote {out}: {args.method} {sparsity.describe()} of {len(masks)} linears in {seconds:.1f} s; "
          f"{zeros / total:.1%} of their weights are zero ({zeros / everything:.1%} of all parameters; the embedding, "
          f"head and norms are dense); {dir_bytes(out) / 1e6:.1f} MB on disk (dense tensors and masks)")
    return 0
