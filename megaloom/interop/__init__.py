"""Hugging Face and GGUF weights in, Hugging Face weights out (docs/interop.md).

- hparams.py  model.* keys from a config.json or GGUF metadata (read by megaloom.config; imports nothing above)
- names.py    what maps to what: megaloom parameters as Hugging Face tensors, per family
- sources.py  safetensors (sliced reads) and GGUF (dequantised) weights under Hugging Face names
- fill.py     pretrained weights into the pieces a rank holds, in any layout
- load.py     load_model / load_parallel_model from a run, a checkpoint, an HF directory or a .gguf
- export.py   a checkpoint to a Hugging Face directory; a pretrained model to a megaloom checkpoint

The names below are imported on first use, so that `megaloom.config` can read `interop.hparams`
without loading the training stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_model": "megaloom.interop.load",
    "load_parallel_model": "megaloom.interop.load",
    "PretrainedWeights": "megaloom.interop.load",
    "export_hf": "megaloom.interop.export",
    "import_pretrained": "megaloom.interop.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megaloom.interop' has no attribute {name!r}")
