"""zb-h1 defers the weight gradients to its W pass, after FSDP2's post-backward hook (which fires at the
I pass) has reduce-scattered them: config validation refuses zb-h1 with ZeRO-2/3 under pipelining, in
one line naming parallel.schedule, parallel.zero and the fix; ZeRO-0/1 are accepted."""

import pytest

from megaloom.config import ConfigError, load_config


def _load(zero):
    return load_config(None, ["model.layers=4", "parallel.pp=2", "parallel.dp=2", "parallel.schedule='zb-h1'",
                              f"parallel.zero={zero}", "train.global_batch=8", "train.micro_batch=1"])


@pytest.mark.parametrize("zero", [2, 3])
def test_zb_h1_with_zero_2_3_is_refused(zero):
    with pytest.raises(ConfigError) as err:
        _load(zero)
    msg = str(err.value)
    assert "\n" not in msg
    assert "parallel.schedule" in msg and f"parallel.zero = {zero}" in msg
    assert '"1f1b"' in msg and "0 or 1" in msg  # the fix: another schedule, or ZeRO-0/1


@pytest.mark.parametrize("zero", [0, 1])
def test_zb_h1_with_zero_0_1_is_accepted(zero):
    assert _load(zero).parallel.zero == zero
