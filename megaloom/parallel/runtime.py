"""Start-up of a (possibly multi-process) run: backend, device, process grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megaloom.config import Config, ConfigError
from megaloom.parallel.comm import TPGroup
from megaloom.parallel.grid import ProcessGrid, validate_sizes


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher (torchrun, Slurm via torchrun) tells a process; read once by the CLI."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def start(cfg: Config, env: LaunchEnv) -> tuple[ProcessGrid, torch.device]:
    """Validate the layout against the world size, pick the device and backend, build the grid."""
    p = cfg.parallel
    validate_sizes(p.tp, p.pp, p.dp, env.world_size, cfg.model)  # before any process group exists
    device = _device(cfg.train.device, env)
    if env.world_size > 1 and not dist.is_initialized():
        backend = p.backend if p.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if backend == "nccl" and device.type != "cuda":
            raise ConfigError("parallel.backend = \"nccl\" needs GPUs; use \"gloo\" or \"auto\" on CPUs")
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
    return ProcessGrid.from_config(p, cfg.model, rank=env.rank, world_size=env.world_size), device


def tp_group(grid: ProcessGrid, sequence_parallel: bool) -> TPGroup | None:
    if grid.tp == 1:
        return None
    return TPGroup(grid.tp_group, grid.tp, grid.tp_rank, sequence_parallel=sequence_parallel)


def _device(name: str, env: LaunchEnv) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but no CUDA device is visible; use train.device=\"cpu\" or \"auto\"")
    if name == "cuda":  # one GPU per process: torchrun's LOCAL_RANK picks it
        name = f"cuda:{env.local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device
