"""Pure rank arithmetic of the process grid and its validation; no processes."""

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megaloom.config import ConfigError, ModelConfig, ParallelConfig
from megaloom.parallel.grid import (
    Axis,
    Coords,
    ProcessGrid,
    coords,
    group_of,
    group_ranks,
    rank_of,
    validate_sizes,
)

sizes = st.integers(1, 6)

# ---------------------------------------------------------------- rank arithmetic


@given(tp=sizes, pp=sizes, dp=sizes, data=st.data())
def test_coords_rank_of_round_trip(tp, pp, dp, data):
    rank = data.draw(st.integers(0, tp * pp * dp - 1))
    c = coords(rank, tp, pp, dp)
    assert rank_of(c, tp, pp, dp) == rank
    assert rank == c.pp * dp * tp + c.dp * tp + c.tp


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 1), (2, 1, 1), (1, 3, 1), (1, 1, 4), (2, 4, 2), (3, 2, 5), (8, 4, 2)])
def test_coords_cover_the_grid_once(tp, pp, dp):
    world = tp * pp * dp
    seen = {coords(r, tp, pp, dp) for r in range(world)}
    assert seen == {Coords(tp=t, dp=d, pp=p) for t in range(tp) for d in range(dp) for p in range(pp)}


def test_tp_rank_varies_fastest_then_dp_then_pp():
    assert [coords(r, 2, 2, 2) for r in (0, 1, 2, 4)] == [
        Coords(tp=0, dp=0, pp=0), Coords(tp=1, dp=0, pp=0), Coords(tp=0, dp=1, pp=0), Coords(tp=0, dp=0, pp=1)]


def test_out_of_range_rank_and_coords_raise():
    with pytest.raises(ValueError, match=r"rank 8 is outside 0\.\.7"):
        coords(8, 2, 2, 2)
    with pytest.raises(ValueError, match="outside"):
        rank_of(Coords(tp=2, dp=0, pp=0), 2, 2, 2)


def test_megatron_documented_layout():
    # Megatron-LM's parallel_state example: 16 GPUs, tp=2, pp=4, hence dp=2.
    tp, pp, dp = 2, 4, 2
    assert group_ranks(Axis.TP, tp, pp, dp) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert group_ranks(Axis.DP, tp, pp, dp) == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert group_ranks(Axis.PP, tp, pp, dp) == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert group_ranks(Axis.MP, tp, pp, dp) == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]


@settings(max_examples=60)
@given(tp=sizes, pp=sizes, dp=sizes, axis=st.sampled_from(list(Axis)))
def test_groups_partition_the_world(tp, pp, dp, axis):
    groups = group_ranks(axis, tp, pp, dp)
    size = {Axis.TP: tp, Axis.DP: dp, Axis.PP: pp, Axis.MP: tp * pp}[axis]
    assert sorted(r for g in groups for r in g) == list(range(tp * pp * dp))
    assert all(len(g) == size and g == sorted(g) for g in groups)
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)
    assert all(group_of(r, axis, tp, pp, dp) == g for g in groups for r in g)


@given(tp=sizes, pp=sizes, dp=sizes)
def test_groups_differ_only_on_their_axis(tp, pp, dp):
    for axis in Axis:
        for g in group_ranks(axis, tp, pp, dp):
            fixed = {dataclasses.replace(coords(r, tp, pp, dp), **{n: 0 for n in axis.varies}) for r in g}
            assert len(fixed) == 1


def test_axis_values():
    assert [a.value for a in Axis] == ["tp", "dp", "pp", "mp"]
    assert Axis("pp") is Axis.PP


# ---------------------------------------------------------------- the grid object


def test_single_process_grid():
    grid = ProcessGrid.build(1, 1, 1)
    assert (grid.tp, grid.pp, grid.dp, grid.world_size, grid.rank) == (1, 1, 1, 1, 0)
    assert grid.coords == Coords(tp=0, dp=0, pp=0)
    assert (grid.tp_group, grid.dp_group, grid.pp_group, grid.mp_group) == (None, None, None, None)
    assert all(grid.group(a) is None and grid.size(a) == 1 and grid.ranks(a) == [0] for a in Axis)
    assert grid.is_first_stage and grid.is_last_stage
    assert grid.next_stage_rank is None and grid.prev_stage_rank is None
    assert repr(grid) == "ProcessGrid(tp=1, pp=1, dp=1, rank=0)"


def test_from_config_single_process():
    grid = ProcessGrid.from_config(ParallelConfig(), ModelConfig(), 0, 1)
    assert grid == ProcessGrid(1, 1, 1)


def test_build_without_distributed_refuses_many_ranks():
    with pytest.raises(RuntimeError, match="not initialized but the grid has 4 ranks; launch with torchrun"):
        ProcessGrid.build(2, 2, 1, world_size=4)


def test_build_validates_before_anything():
    with pytest.raises(ConfigError, match="world size is 1 processes; try parallel.tp=1 and parallel.dp=1"):
        ProcessGrid.build(2, 1, 1)


@pytest.mark.parametrize("rank", range(16))
def test_layout_properties_for_every_rank(rank):
    grid = ProcessGrid(2, 4, 2, rank=rank)
    assert (grid.tp_rank, grid.dp_rank, grid.pp_rank) == (rank % 2, rank // 2 % 2, rank // 4)
    for axis in Axis:
        assert grid.ranks(axis) in group_ranks(axis, 2, 4, 2) and rank in grid.ranks(axis)
    assert grid.size(Axis.MP) == len(grid.ranks(Axis.MP)) == 8
    assert grid.is_first_stage == (rank < 4) and grid.is_last_stage == (rank >= 12)
    assert grid.next_stage_rank == (None if rank >= 12 else rank + 4)
    assert grid.prev_stage_rank == (None if rank < 4 else rank - 4)


def test_layout_only_grid_has_no_groups_for_real_axes():
    grid = ProcessGrid(2, 1, 1, rank=1)
    assert grid.pp_group is None and grid.dp_group is None
    with pytest.raises(RuntimeError, match="no tp group of size 2"):
        grid.group(Axis.TP)


def test_grid_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank 4 is outside"):
        ProcessGrid(2, 2, 1, rank=4)


def test_describe_lists_every_group():
    text = ProcessGrid(2, 2, 2, rank=5).describe()
    assert "tp=2 x pp=2 x dp=2 = 8 ranks; this is rank 5 (tp_rank=1, dp_rank=0, pp_rank=1)" in text
    assert "rank = pp_rank*(dp*tp) + dp_rank*tp + tp_rank" in text
    assert "tp groups: [0, 1] [2, 3] [4, 5] [6, 7]" in text
    assert "dp groups: [0, 2] [1, 3] [4, 6] [5, 7]" in text
    assert "pp groups: [0, 4] [1, 5] [2, 6] [3, 7]" in text
    assert "mp groups: [0, 1, 4, 5] [2, 3, 6, 7]" in text


# ---------------------------------------------------------------- validation


def _error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        validate_sizes(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("tp,pp,dp,name,value", [(0, 1, 1, "tp", 0), (1, -1, 1, "pp", -1), (1, 1, 0, "dp", 0)])
def test_sizes_must_be_positive(tp, pp, dp, name, value):
    assert _error(tp, pp, dp, 1) == f"parallel.{name} = {value} must be at least 1; try parallel.{name}=1"


def test_world_size_must_be_positive():
    assert _error(1, 1, 1, 0) == "the world size is 0 processes; launch at least 1"


def test_product_mismatch_suggests_dp():
    assert _error(2, 2, 1, 8) == ("parallel.tp (2) x parallel.pp (2) x parallel.dp (1) = 4 "
                                  "but the world size is 8 processes; try parallel.dp=2")


def test_product_mismatch_suggests_tp_then_pp():
    assert _error(3, 1, 1, 8).endswith("= 3 but the world size is 8 processes; try parallel.tp=2 and parallel.dp=4")
    assert _error(1, 3, 1, 8).endswith("try parallel.tp=1, parallel.pp=2 and parallel.dp=4")


def test_product_mismatch_suggestion_respects_the_model():
    # 6 processes, tp=4: tp=3 would fit the world but not 4 heads, so tp=2 is suggested.
    assert _error(4, 1, 1, 6).endswith("try parallel.tp=3 and parallel.dp=2")
    assert _error(4, 1, 1, 6, ModelConfig(heads=4)).endswith("try parallel.tp=2 and parallel.dp=3")


def _apply_suggestion(message: str, tp: int, pp: int, dp: int) -> tuple[int, int, int]:
    new = {"tp": tp, "pp": pp, "dp": dp}
    new.update({k: int(v) for k, v in re.findall(r"parallel\.(tp|pp|dp)=(\d+)", message.split("; ")[-1])})
    return new["tp"], new["pp"], new["dp"]


@given(tp=sizes, pp=sizes, dp=sizes, world=st.integers(1, 36))
def test_product_suggestion_fits_the_world(tp, pp, dp, world):
    # 720720 = lcm(1..16) splits over any tp; 12 heads and layers leave room for several tp and pp values.
    model = ModelConfig(layers=12, heads=12, hidden=720, vocab_size=720720)
    for m in (None, model):
        try:
            validate_sizes(tp, pp, dp, world, m)
        except ConfigError as e:
            if "world size is" in str(e):
                _assert_fixed(validate_sizes, *_apply_suggestion(str(e), tp, pp, dp), world, m, broken=("world size is",))


def _assert_fixed(check, *args, broken: tuple[str, ...]) -> None:
    """`check(*args)` passes, or fails for another reason than those named in `broken`."""
    try:
        check(*args)
    except ConfigError as e:
        assert not any(b in str(e) for b in broken), str(e)


def test_heads_not_divisible():
    model = ModelConfig(hidden=768, heads=12)  # GPT-2 small
    assert _error(8, 1, 3, 24, model) == ("model.heads (12) must be divisible by parallel.tp (8); "
                                          "valid tp values: 1, 2, 3, 4, 6, 12")
    # on 8 processes only the tp values that leave a whole dp are listed
    assert _error(8, 1, 1, 8, model).endswith("valid tp values: 1, 2, 4")


def test_kv_heads_not_divisible():
    model = ModelConfig(family="llama", hidden=512, heads=8, kv_heads=2)
    assert _error(4, 1, 1, 4, model) == "model.kv_heads (2) must be divisible by parallel.tp (4); valid tp values: 1, 2"


def test_any_vocabulary_splits_over_any_tp():
    """GPT-2's 50,257 rows split as ceil(V/t) per rank, the last shard padded (megaloom/parallel/shard.py)."""
    for tp in (2, 4):
        validate_sizes(tp, 1, 1, tp, ModelConfig(vocab_size=50257))
    # only a vocabulary so small that the last rank would hold padding alone is refused
    assert _error(4, 1, 1, 4, ModelConfig(vocab_size=6)) == (
        "parallel.tp (4) splits model.vocab_size (6) into 2 rows per rank, which leaves the last rank no real row; "
        "try parallel.tp=3 or a larger model.vocab_size")


def test_ffn_not_divisible_names_the_effective_width():
    llama = ModelConfig(family="llama", hidden=384, heads=6, vocab_size=4098)  # ffn 8h/3 -> 1024
    assert _error(3, 1, 2, 6, llama) == ("model.ffn_hidden (0, effective 1024) must be divisible by parallel.tp (3); "
                                         "valid tp values: 1, 2")
    explicit = ModelConfig(ffn_hidden=1001)
    assert _error(2, 1, 1, 2, explicit) == "model.ffn_hidden (1001) must be divisible by parallel.tp (2); valid tp values: 1"


def test_layers_not_divisible():
    model = ModelConfig(layers=10)
    assert _error(1, 4, 2, 8, model) == "model.layers (10) must be divisible by parallel.pp (4); valid pp values: 1, 2"


@given(tp=sizes, pp=sizes, dp=sizes, heads=st.integers(1, 12), layers=st.integers(1, 12))
def test_listed_values_are_valid(tp, pp, dp, heads, layers):
    world = tp * pp * dp
    model = ModelConfig(layers=layers, heads=heads, hidden=60 * heads, vocab_size=720720)
    try:
        validate_sizes(tp, pp, dp, world, model)
    except ConfigError as e:
        axis, values = re.search(r"valid (tp|pp) values: ([\d, ]+)$", str(e)).groups()
        broken = ("model.heads", "model.kv_heads", "model.ffn_hidden") if axis == "tp" else ("model.layers",)
        for v in map(int, values.split(", ")):
            t, p = (v, pp) if axis == "tp" else (tp, v)
            _assert_fixed(validate_sizes, t, p, world // (t * p), world, model, broken=broken)


def test_valid_layout_passes():
    validate_sizes(2, 2, 2, 8, ModelConfig(layers=4, heads=4, hidden=256, vocab_size=4096))
