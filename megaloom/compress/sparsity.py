"""`train.keep_sparsity`: pruned weights stay zero through training, in any layout.

A step hook the command line hands the trainer (which never imports this package). At the start it
reads the keep-masks of the checkpoint the run loaded or resumed from (`mask/<name>`, written by
`megaloom prune` and by every checkpoint of a run with this hook), each rank only the pieces of the
weights it holds, as the weights themselves are read (tensor shards, pipeline stages, ZeRO shards); a
checkpoint without masks (a pruned model exported to Hugging Face and loaded as model.pretrained)
gives the masks of its zeros. After every optimizer step the masked weights are set back to zero
(AdamW's moments and weight decay would otherwise move them), and the masks are saved with the run's
checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megaloom.train.checkpoint import load, saved_keys
from megaloom.train.sharded_state import Piece, Sharded, full_shape, named_parameters, tensor_pieces

PREFIX = "mask/"


class KeepSparsity:
    def __init__(self) -> None:
        self.masks: dict[str, Sharded] = {}  # mask/<name> -> this rank's pieces (bool), offsets as the weight's

    def _params(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in named_parameters(model)}

    def start(self, model: torch.nn.Module, ckpt: Path | None, group=None) -> str:  # noqa: ANN001
        """Read the masks of `ckpt` (or take the zeros of the weights); say what is kept sparse."""
        params = self._params(model)
        saved = saved_keys(ckpt) if ckpt is not None else {}
        names = sorted(k[len(PREFIX):] for k in saved if k.startswith(PREFIX)) if saved else []
        from_file = bool(names)
        if not names:  # every matrix that has zeros
            names = sorted(n for n, p in params.items() if p.dim() == 2 and bool((p.detach() == 0).any()))
        names = [n for n in names if n in params]
        for name in names:
            p = params[name]
            pieces = [Piece(torch.ones_like(pc.view, dtype=torch.bool), pc.offsets) for pc in tensor_pieces(p)]
            self.masks[PREFIX + name] = Sharded(full_shape(p), pieces)
        if from_file:
            with torch.no_grad():
                load(ckpt, dict(self.masks), group)
        else:
            for name in names:
                for mask, pc in zip(self.masks[PREFIX + name].pieces, tensor_pieces(params[name])):
                    mask.view.copy_(pc.view != 0)
        self.apply(model)
        return (f"train.keep_sparsity: {len(names)} weight matrices kept sparse "
                f"({'masks of ' + str(ckpt) if from_file else 'the zeros of the loaded weights'})")

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> None:
        """Zero the masked weights of this rank's pieces (views into the parameters' own memory)."""
        params = self._params(model)
        for key, sharded in self.masks.items():
            for mask, pc in zip(sharded.pieces, tensor_pieces(params[key[len(PREFIX):]])):
                pc.view.mul_(mask.view)

    def entries(self) -> dict[str, Sharded]:
        """The masks, for the run's checkpoints."""
        return dict(self.masks)
