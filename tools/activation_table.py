"""Print docs/performance.md's activation-memory table: `.venv/bin/python -m tools.activation_table`.

Bytes each layer keeps for backward after a bf16-autocast forward on the CPU (bench/activations.py),
GPT-2 family, dropout 0.1, s = 256, b = 2, h = 768, a = 12, against Korthikanti et al.'s formula.
"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.activations import per_layer_bytes
from megaloom.config import ModelConfig
from megaloom.model import build_model
from megaloom.model.recompute import set_recompute
from megaloom.perf.memory import activation_bytes_per_layer

S, B, H, A = 256, 2, 768, 12
FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def per_layer(mode: str, backends) -> float:
    def build(layers: int) -> torch.nn.Module:
        cfg = ModelConfig(family="gpt2", layers=layers, hidden=H, heads=A, vocab_size=256, seq_len=S, dropout=0.1)
        return set_recompute(build_model(cfg, 0), mode).train()

    x = torch.randint(0, 256, (B, S + 1), generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(backends):
        return per_layer_bytes(build, lambda m: m(x[:, :-1], x[:, 1:]), torch.bfloat16)


if __name__ == "__main__":
    sbh = S * B * H
    print("| mode | SDPA kernel | measured | formula | measured / formula |\n|---|---|---|---|---|")
    for mode, kernel, backends in [("none", "fused (flash)", FUSED), ("none", "math (scores stored)", [SDPBackend.MATH]),
                                   ("selective", "either", FUSED), ("full", "either", FUSED)]:
        got, formula = per_layer(mode, backends) / sbh, activation_bytes_per_layer(S, B, H, A, recompute=mode) / sbh
        print(f"| {mode} | {kernel} | {got:.2f} | {formula:.2f} | {got / formula:.3f} |")
