"""The GPU benchmark harness runs end to end at toy sizes on the CPU (its GPU numbers come from
the lent H100; see bench/RESULTS.md)."""

import pytest
import torch

from bench.gpu import MegaloomRun, Shape, largest_micro_batch, main, reference_run
from megaloom.model import count_parameters


def test_harness_runs_every_section_and_appends(tmp_path):
    out = tmp_path / "RESULTS.md"
    text = main(["--device", "cpu", "--tiny", "--shapes", "124m", "--steps", "2", "--warmup", "1", "--compile", "off",
                 "--capacity-cap", "4", "--append", str(out)])
    for needle in ("matmul 256³", "reference eager", "megaloom eager", "megaloom bare loop eager",
                   "megaloom / best reference", "wrapper cost at t=p=d=1 (eager)", "recompute=full",
                   "activation bytes per layer", "largest micro-batch"):
        assert needle in text, needle
    recorded = out.read_text()
    assert "Command: `python -m bench.gpu --device cpu --tiny" in recorded and "torch " in recorded and text in recorded


def test_reference_is_the_same_model_size():
    shape = Shape("t", 2, 64, 4, 32, 2, vocab=128)
    ref = reference_run(shape, torch.device("cpu"), compile=False)
    mega = MegaloomRun(shape, torch.device("cpu"), compile=False)
    n = sum(p.numel() for p in ref.model.parameters())
    assert n == count_parameters(shape.model_config()) == sum(p.numel() for p in mega.model.parameters())


@pytest.mark.parametrize("limit", [0, 1, 5, 8, 13, 100])
def test_largest_micro_batch_search(limit):
    tried = []

    def fits(b):
        tried.append(b)
        return b <= limit

    assert largest_micro_batch(fits, 4, 64) == min(limit, 64)
    assert len(tried) <= 12
