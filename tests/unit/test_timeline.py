"""Schedule pictures (PNG and text) and the `megaloom schedule` verb."""

import re

import pytest

from megaloom.cli import main
from megaloom.observe.timeline import draw_timeline, text_timeline
from megaloom.parallel.schedules import Costs, gpipe, interleaved_1f1b, one_f_one_b, simulate, zero_bubble_h1


@pytest.mark.parametrize("sched", [interleaved_1f1b(4, 8, 2), zero_bubble_h1(3, 6)], ids=lambda s: s.name)
def test_png_is_written(tmp_path, sched):
    out = draw_timeline(simulate(sched), tmp_path / "deep" / "t.png", title="a title")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_text_timeline_gpipe_shows_the_bubble():
    text = text_timeline(simulate(gpipe(4, 4), Costs(forward=1, backward=2)))
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("rank 0 |F0 F1 F2 F3 .") and lines[0].endswith("B3--- |")
    assert lines[3].startswith("rank 3 |.........F0 F1 F2 F3 B0--- ")  # waits 3 forwards for the pipeline to fill
    assert len({len(line) for line in lines}) == 1
    # 3 forward cells wait at the start of rank 3, 3 backward pairs at the end: (p-1)(t_f+t_b) = 9 units of 3 chars
    assert lines[3].count(".") == 9 * 3


def test_text_timeline_fits_a_width_and_scales_non_integer_costs():
    sim = simulate(one_f_one_b(8, 16), Costs(forward=1, backward=2))
    assert all(len(line) <= 100 for line in text_timeline(sim, width=100).splitlines())
    chunked = text_timeline(simulate(interleaved_1f1b(2, 2, 2)))  # chunk passes take 1/2
    assert chunked.splitlines()[0].startswith("rank 0 |0F0 0F1 1F0 1F1 ")
    latency = text_timeline(simulate(one_f_one_b(2, 1), Costs(forward=1, backward=2, p2p=0.5)))
    # times fall on a 0.5 grid, so a unit gets 4 characters: rank 1 waits F0 on rank 0 plus a hop, 1.5 units
    assert latency.splitlines()[1].startswith("rank 1 |......F0  ")


def test_text_timeline_zero_bubble_labels():
    text = text_timeline(simulate(zero_bubble_h1(2, 2)))
    assert re.search(r"I0 +W0", text.splitlines()[0])


def test_cli_schedule(tmp_path, capsys):
    png = tmp_path / "sched.png"
    assert main(["schedule", "--schedule", "gpipe", "--pp", "4", "--microbatches", "4", "-o", str(png)]) == 0
    out = capsys.readouterr().out
    assert "bubble: 75.0% of ideal time (paper: (p-1)/m = 75.0%)" in out
    assert "peak in flight (microbatches with activations held): rank 0: 4, rank 1: 4" in out
    assert png.stat().st_size > 10_000 and out.count("\nrank ") == 3


@pytest.mark.parametrize("argv,needle", [
    (["--schedule", "interleaved", "--chunks", "2", "--pp", "4", "--microbatches", "8"],
     "bubble: 18.8% of ideal time (paper: (p-1)/(m*v) = 18.8%)"),
    (["--schedule", "zb-h1", "--pp", "4", "--microbatches", "8"],
     "bubble: 12.5% of ideal time (Qi et al.: (p-1)/(3m) = 12.5%"),
    (["--pp", "4", "--microbatches", "8", "--p2p", "0.5"], "(paper: (p-1)/m = 37.5%)"),
])
def test_cli_schedule_kinds(capsys, argv, needle):
    assert main(["schedule", *argv]) == 0
    assert needle in capsys.readouterr().out


def test_cli_schedule_error_is_one_line(capsys):
    assert main(["schedule", "--schedule", "interleaved", "--chunks", "2", "--pp", "4", "--microbatches", "6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs microbatches (6) to be a multiple of parallel.pp (4)" in err


def test_cli_schedule_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["schedule", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--microbatches" in out and "zb-h1" in out
