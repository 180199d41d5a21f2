"""Sharded, atomic, verifiable checkpoints that load into any layout.

Layout of `<run>/checkpoints/step_00000200/`:
  __<rank>_0.distcp   what rank <rank> wrote: its pieces of the model and of Adam's moments, in the
                      full tensors' coordinates (see sharded_state.py), plus pickled objects
  .metadata           DCP's index: every tensor's full shape and which chunks each file holds
  config.toml         the resolved config of the run that saved it
  manifest.json       step, layout, and the size and SHA-256 of every file above; written last

Saving is a collective (every rank calls it). Files go to `.tmp-step_00000200/`, are fsynced, the
manifest is written, then the directory is renamed into place and the `latest` pointer updated. A
crash at any point leaves either no new directory or a complete one: a half-written checkpoint has no
manifest (or a wrong one) and is never selected. With `checkpoint.async` the tensors are copied to the
CPU in the step and written by a background thread over a process group of its own.

Loading reads, on every rank, only the chunks that overlap what the rank holds now, so a checkpoint
saved at one (t, p, d, ZeRO) loads at any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from megaloom.errors import RunError
from megaloom.train.sharded_state import Piece, PieceLoadPlanner, PieceSavePlanner, Sharded, model_entries

CKPT_DIR = "checkpoints"
MANIFEST = "manifest.json"
FORMAT = "megaloom-checkpoint"
VERSION = 1


class CheckpointError(RunError):
    """A checkpoint that cannot be used: the message is one line that names it and says why."""


# ------------------------------------------------------------------------------------------ saving


class Checkpointer:
    """Saves a run's checkpoints: one directory per step, the newest `keep` kept.

    `group`: the process group saves coordinate over (None in a single process). A background save
    must not share a communicator with training, so async saves get a gloo group of their own."""

    def __init__(self, run_dir: Path, keep: int = 2, async_save: bool = False, rank: int = 0,
                 timeout_s: float = 600.0):
        self.root = Path(run_dir) / CKPT_DIR
        self.keep, self.async_save, self.rank = keep, async_save, rank
        self.group = None
        if dist.is_initialized():  # collective: every rank builds its Checkpointer at the same point
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))  # all ranks
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, step: int, state: dict[str, Any], config_toml: str, layout: dict[str, Any]) -> Path:
        """Write `state` (Sharded pieces and picklable objects) as checkpoint `step`. Collective."""
        self.wait()  # one save at a time
        final = self.root / f"step_{step:08d}"
        if not self.async_save:
            self._write(step, state, config_toml, layout)
            return final
        staged = {k: v.to_cpu() if isinstance(v, Sharded) else v for k, v in state.items()}
        self._thread = threading.Thread(target=self._write_in_background, name=f"checkpoint-{step}",
                                        args=(step, staged, config_toml, layout), daemon=True)
        self._thread.start()
        return final

    def wait(self) -> None:
        """Block until a background save has finished; re-raise its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"background checkpoint save failed: {error}") from error

    def _write_in_background(self, *args) -> None:
        try:
            self._write(*args)
        except BaseException as e:  # noqa: BLE001 - reported by wait()
            self._error = e

    def _write(self, step: int, state: dict[str, Any], config_toml: str, layout: dict[str, Any]) -> None:
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):  # left by a crash during an earlier save
                shutil.rmtree(stale, ignore_errors=True)
        final = self.root / f"step_{step:08d}"
        write_directory(final, state, config_toml, step, layout, self.rank, self.group)
        if self.rank == 0:
            _write_atomic(self.root / "latest", final.name + "\n")
            for stale in sorted(_step_dirs(self.root))[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(stale, ignore_errors=True)
        _barrier(self.group)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (over the checkpoint group)."""
        return all_gather(obj, self.group)

    def unresponsive_ranks(self, timeout_s: float) -> list[int]:
        """After a failed collective: the ranks that do not answer a monitored barrier on the checkpoint
        group (gloo, untouched by the training communicator's failure). Known on rank 0; [] elsewhere."""
        if self.group is None:
            return []
        try:
            dist.monitored_barrier(group=self.group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
        except RuntimeError as e:
            found = re.search(r"[Rr]anks? ([\d, ]+) failed", str(e))
            if found:
                return [int(r) for r in found.group(1).replace(",", " ").split()]
        return []


def write_directory(final: Path, state: dict[str, Any], config_toml: str, step: int, layout: dict[str, Any],
                    rank: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """Write `state` as checkpoint directory `final`, atomically. Collective over `group`.

    Files go to `.tmp-<name>` beside it; every rank hashes the files it wrote, rank 0 adds the
    manifest, fsyncs and renames. An existing `final` is moved aside only once the new one is complete."""
    tmp = final.with_name(f".tmp-{final.name}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(group)
    with _single_process_quiet():
        dcp.save(state, storage_writer=FileSystemWriter(tmp, sync_files=True), planner=PieceSavePlanner(),
                 process_group=group, no_dist=group is None)
    mine = {f.name: _file_record(f) for f in sorted(tmp.glob(f"__{rank}_*"))}
    files = {name: rec for part in all_gather(mine, group) for name, rec in part.items()}
    if rank == 0:
        (tmp / "config.toml").write_text(config_toml, encoding="utf-8")
        for name in (".metadata", "config.toml"):
            _fsync(tmp / name)
            files[name] = _file_record(tmp / name)
        manifest = {"format": FORMAT, "version": VERSION, "step": step, "layout": layout, "files": files}
        _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        _fsync(tmp)
        if final.exists():  # saving the same step again: the old copy goes only once the new one is in place
            old = final.with_name(f".tmp-old-{final.name}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(final.parent)


def all_gather(obj: Any, group: dist.ProcessGroup | None) -> list[Any]:
    """Every rank's `obj` in rank order; [obj] in a single process."""
    if group is None:
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, obj, group=group)
    return parts


def _barrier(group: dist.ProcessGroup | None) -> None:
    if group is not None:
        dist.barrier(group=group)


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it runs without torch.distributed; in one process that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


# --------------------------------------------------------------------------- finding and verifying


def _step_dirs(root: Path) -> list[Path]:
    return [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]


def verify(ckpt: Path, share: tuple[int, int] = (0, 1), gather=None) -> str | None:
    """None when every file the manifest lists is there with its size and SHA-256; else why not.

    Hashing a large checkpoint is the slow part of a restart, so it is shared: with `share` =
    (rank, world) a process hashes every world-th file, and `gather` (an all-gather of one object per
    rank) combines the findings, so every rank returns the same answer."""
    problem = _check_files(ckpt, *share)
    if gather is not None:
        problem = next((p for p in gather(problem) if p is not None), None)
    return problem


def _check_files(ckpt: Path, rank: int, world: int) -> str | None:
    path = ckpt / MANIFEST
    if not path.is_file():
        return "no manifest.json (an interrupted save)"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest.json ({e})"
    if manifest.get("format") != FORMAT:
        return f"manifest.json is not a {FORMAT} manifest"
    for i, (name, rec) in enumerate(sorted(files.items())):
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != rec["bytes"]:
            return f"{name} has {size} bytes, the manifest says {rec['bytes']} (truncated?)"
        if i % world == rank and _sha256(f) != rec["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (corrupted)"
    return None


def find_checkpoint(path: Path, report=None, share: tuple[int, int] = (0, 1), gather=None) -> Path | None:
    """The newest valid checkpoint of a run directory (or `path` itself, if it is a valid checkpoint);
    None when there is none. Invalid ones are reported through `report`, one line each, and skipped.
    `share` and `gather` split the verification over the ranks (see `verify`)."""
    path = Path(path)
    candidates = [path] if (path / MANIFEST).exists() or (path / ".metadata").exists() else \
        sorted(_step_dirs(path / CKPT_DIR), key=lambda p: int(p.name[5:]), reverse=True)
    for ckpt in candidates:
        problem = verify(ckpt, share, gather)
        if problem is None:
            return ckpt
        if report is not None:
            report(f"checkpoint {ckpt} is not usable: {problem}; trying the previous one")
    return None


def latest_checkpoint(path: Path) -> Path:
    """Like find_checkpoint, but a missing checkpoint is an error (for `generate`, `convert`)."""
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"'{path}' holds no valid checkpoint (a checkpoint directory with manifest.json, "
                                f"or a run directory with {CKPT_DIR}/step_*); pass one that finished a save")
    return ckpt


def read_manifest(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))


def saved_keys(ckpt: Path) -> dict[str, tuple[int, ...] | None]:
    """Every entry of a checkpoint: tensors with their full shapes, objects with None."""
    md = FileSystemReader(ckpt).read_metadata()
    return {k: None if isinstance(v, BytesStorageMetadata) else tuple(v.size) for k, v in md.state_dict_metadata.items()}


# ------------------------------------------------------------------------------------------ loading


def load(ckpt: Path, state: dict[str, Any], group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Fill the pieces of `state` in place from `ckpt` and return its objects (the keys of `state`
    whose value is not Sharded). Collective over `group` when one is given."""
    planner = PieceLoadPlanner()
    with _single_process_quiet():
        dcp.load(state, storage_reader=FileSystemReader(ckpt), planner=planner, process_group=group,
                 no_dist=group is None)
    return planner.objects


def check_model_keys(ckpt: Path, wanted: dict[str, Sharded], group: dist.ProcessGroup | None = None,
                     extra_ok: tuple[str, ...] = ()) -> None:
    """One clear error when the checkpoint holds another model than the one built from the config.
    Under pipelining each rank holds some layers: the union over `group` must be the saved set, except
    for parameters named with a prefix in `extra_ok` (an objective's own heads, which a frozen reference
    built from the same checkpoint does not have)."""
    saved = {k: v for k, v in saved_keys(ckpt).items()
             if k.startswith("model/") and not k[len("model/"):].startswith(extra_ok or ("\0",))}
    everywhere = {k for part in all_gather(sorted(wanted), group) for k in part}
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - everywhere)
    if missing or extra:
        what = f"lacks {missing[0][6:]}" if missing else f"has {extra[0][6:]}, which this model does not"
        raise CheckpointError(f"checkpoint {ckpt} holds a different model: it {what} "
                              f"({len(missing)} missing, {len(extra)} unexpected); set the model.* keys it was "
                              f"saved with (see its config.toml)")
    for k, sharded in wanted.items():
        if saved[k] != tuple(sharded.shape):
            raise CheckpointError(f"checkpoint {ckpt} holds a different model: {k[6:]} has shape {saved[k]} there "
                                  f"but {tuple(sharded.shape)} here; set the model.* keys of its config.toml")


def load_peft_run(ckpt: Path, model: torch.nn.Module, saved: Callable, base: Callable, adapt: Any,
                  weights: Callable | None = None, group: dist.ProcessGroup | None = None,
                  extra: dict[str, Any] | None = None, missing: str = "") -> tuple[dict[str, Any], str | None, str]:
    """Fill a PEFT model from its run's checkpoint, as every reader of one does (resume, eval and generate, a
    distillation teacher, PPO's reward model). From `ckpt`: the parameters `saved` selects (the adapters and
    whatever else the run trained, a score or value head) and the `extra` entries (resume: the optimizer
    state); the checkpoint's record of the base its adapters were trained on, checked against the hook's
    (`adapt.check`, one line otherwise); the parameters `base` selects from `weights` (model.pretrained's
    loader; None: the seed's initialisation they hold); then the hook's last steps once the base holds its
    weights (`adapt.loaded(model, fresh=False)`: DoRA's magnitudes come from the checkpoint, an NF4 base is
    quantized as the run's was). `missing`: the error when `ckpt` holds no PEFT run's adapters.
    Returns load()'s objects, what `weights` and the hook said. Collective over `group`."""
    state = model_entries(model, saved)
    check_model_keys(ckpt, state, group)
    if "peft_base" not in saved_keys(ckpt):
        raise CheckpointError(missing or f"checkpoint {ckpt} holds no adapters of a PEFT run; load it without "
                                         "peft.method, or give the PEFT run's own checkpoint")
    state["peft_base"] = None
    state.update(extra or {})
    with torch.no_grad():
        objects = load(ckpt, state, group)
        adapt.check(objects["peft_base"], ckpt)
        said = weights(model_entries(model, base)) if weights is not None else None
        return objects, said, adapt.loaded(model, fresh=False)



def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load a checkpoint's weights into a single-process model (e.g. for `megaloom generate`)."""
    from megaloom.train.sharded_state import model_entries

    state = model_entries(model)
    check_model_keys(ckpt, state)
    with torch.no_grad():
        load(ckpt, state)


def full_tensors(ckpt: Path, prefix: str = "model/") -> dict[str, torch.Tensor]:
    """Every tensor under `prefix`, whole, on the CPU (names without the prefix). One process."""
    md = FileSystemReader(ckpt).read_metadata().state_dict_metadata
    state: dict[str, Any] = {}
    for key, m in md.items():
        if key.startswith(prefix) and not isinstance(m, BytesStorageMetadata):
            full = torch.empty(tuple(m.size), dtype=m.properties.dtype)
            state[key] = Sharded(tuple(m.size), [Piece(full, (0,) * len(m.size))])
    load(ckpt, state)
    return {k[len(prefix):]: v.pieces[0].view for k, v in state.items()}


# ------------------------------------------------------------------------------------------- convert


def export_safetensors(ckpt: Path, out: Path) -> int:
    """A checkpoint's weights as one consolidated safetensors file (canonical names, saved dtype)."""
    from safetensors.torch import save_file

    tensors = full_tensors(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt", "source": str(ckpt)})
    _fsync(tmp)
    os.replace(tmp, out)
    return len(tensors)


def import_safetensors(src: Path, out: Path, config_toml: str = "") -> int:
    """A consolidated safetensors file as a weights-only megaloom checkpoint directory `out`, which
    `checkpoint.load` accepts in any layout (training then starts at step 0 with a fresh optimizer)."""
    from safetensors.torch import load_file

    tensors = load_file(str(src))
    state = {f"model/{k}": Sharded(tuple(v.shape), [Piece(v, (0,) * v.dim())]) for k, v in tensors.items()}
    write_directory(Path(out), state, config_toml, step=0, layout={"weights_only": True})
    return len(tensors)


# ------------------------------------------------------------------------------------------ helpers


def _file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
