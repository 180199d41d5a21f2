"""Start-up of a (possibly multi-process) run: what the launcher says, the backend, the device and the
process grid. Knows no model and no training loop (those are `megaloom.train.assemble`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megaloom.config import Config, ConfigError
from megaloom.parallel.comm import TPGroup
from megaloom.parallel.grid import ProcessGrid, set_group_timeout, validate_sizes


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher (torchrun, Slurm via torchrun) tells a process; read once by the CLI."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    restart: int = 0  # torchrun --max-restarts: how many times the job has been restarted
    master_addr: str = ""  # where torchrun's agent serves its store
    master_port: int = 0
    agent_store: bool = False  # the processes share the agent's store (torchrun's default)


def start(cfg: Config, env: LaunchEnv) -> tuple[ProcessGrid, torch.device]:
    """Validate the layout against the world size, pick the device and backend, build the grid."""
    p = cfg.parallel
    validate_sizes(p.tp, p.pp, p.dp, env.world_size, cfg.model)  # before any process group exists
    device = _device(cfg.train.device, env)
    timeout = timedelta(seconds=p.timeout_s)
    if env.world_size > 1 and not dist.is_initialized():
        backend = p.backend if p.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if backend == "nccl" and device.type != "cuda":
            raise ConfigError("parallel.backend = \"nccl\" needs GPUs; use \"gloo\" or \"auto\" on CPUs")
        # a dead or hung peer makes the waiting collective fail after parallel.timeout_s instead of never
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                store=_restart_store(env, timeout), timeout=timeout)
    set_group_timeout(timeout)
    return ProcessGrid.from_config(p, cfg.model, rank=env.rank, world_size=env.world_size), device


def _restart_store(env: LaunchEnv, timeout: timedelta) -> dist.Store | None:
    """After a torchrun restart the agent's store still holds the dead attempt's addresses, and gloo
    connects to them (torch 2.13: "Connection refused" in connectFullMesh). A prefix per attempt keeps
    each attempt's keys apart. None (torch's own env:// rendezvous) on the first attempt."""
    if env.restart == 0 or not env.agent_store or not env.master_addr:
        return None
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"megaloom/attempt_{env.restart}", store)


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
