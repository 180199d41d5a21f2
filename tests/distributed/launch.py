"""Run a function on n CPU processes joined in a gloo process group, for multi-process tests.

`fn(rank, world_size, *args)` must be a module-level function (spawn pickles it by name). A worker's
exception fails the caller with that worker's traceback (torch's ProcessRaisedException); a worker
that hangs fails it with a TimeoutError after `timeout` seconds.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_workers(fn: Callable[..., None], world_size: int, *args: Any, timeout: float = 60) -> None:
    """Start `world_size` processes, each running `fn(rank, world_size, *args)` inside a gloo group."""
    port = _free_port()
    ctx = mp.spawn(_worker, args=(fn, world_size, port, timeout, args), nprocs=world_size, join=False,
                   start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            _terminate(ctx.processes)
            raise TimeoutError(f"{world_size} workers of {fn.__name__} did not finish in {timeout} s")


def _worker(rank: int, fn: Callable[..., None], world_size: int, port: int, timeout: float,
            args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)  # n processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _terminate(processes: list[Any]) -> None:
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(5)


def train_config(sets: list[str], run_dir: Any, rank: int = 0, world: int = 1,
                 config: str = "configs/debug.toml") -> Any:
    """Train `config` with the `--set` overrides `sets` as `megaloom train` does, as rank `rank` of `world`
    (inside `run_workers`, or alone): rank 0 prepares the corpus, the others then find it ready, and the
    Trainer gets what the command line would give it (`megaloom.cli.training_parts`: pretrained weights,
    the PEFT hook, the objective of a higher layer, step hooks). Returns the Trainer, after its run."""
    from pathlib import Path

    from megaloom.cli import training_parts
    from megaloom.config import load_config
    from megaloom.data.corpus import ensure_corpus_for
    from megaloom.observe.progress import Console
    from megaloom.parallel.launch import LaunchEnv, start
    from megaloom.train.trainer import Trainer

    run_dir = Path(run_dir)
    cfg = load_config(config, sets)
    grid, device = start(cfg, LaunchEnv(rank, world))
    if rank == 0:
        ensure_corpus_for(cfg, run_dir.parent / "cache")
    if world > 1:
        dist.barrier()
    corpus = ensure_corpus_for(cfg, run_dir.parent / "cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a single-process reference runs the workers' one-thread kernels too
    try:
        trainer = Trainer(cfg, run_dir, corpus, Console(quiet=True), grid, device, **training_parts(cfg))
        trainer.run()
    finally:
        torch.set_num_threads(threads)
    return trainer


def train_configs(rank: int, world: int, runs: list[tuple[list[str], Any]]) -> None:
    """A `run_workers` function: every (sets, run_dir) of `runs` trained in turn on the launched grid."""
    for sets, run_dir in runs:
        train_config(sets, run_dir, rank, world)
