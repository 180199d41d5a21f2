import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megaloom.config import ConfigError, describe, load_config, parse_override, to_toml

CONFIGS = ["configs/debug.toml", "configs/demo.toml", "configs/gpt2-124m.toml", "configs/gpt-1.3b.toml",
           "configs/llama-style-small.toml", "configs/sft-stdlib.toml"]


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.hidden % cfg.model.heads == 0


def load_config_from_text(text, tmp):
    p = tmp / "c.toml"
    p.write_text(text)
    return load_config(p)


@pytest.mark.parametrize("path", CONFIGS)
def test_resolved_config_round_trips(path, tmp_path):
    cfg = load_config(path, ["train.steps=7", "data.sources=['a', 'b']"])
    assert load_config_from_text(to_toml(cfg), tmp_path) == cfg


def test_overrides_types():
    cfg = load_config(None, ["train.steps=50", "train.micro_batch=4", "train.global_batch=8", "train.lr=1e-3",
                             "log.progress=false", "data.sources=/some/file.txt", "model.family=llama"])
    assert cfg.train.steps == 50 and cfg.train.micro_batch == 4 and cfg.train.lr == 1e-3
    assert cfg.log.progress is False
    assert cfg.data.sources == ["/some/file.txt"]
    assert cfg.model.family == "llama"
    assert isinstance(load_config(None, ["train.min_lr=0"]).train.min_lr, float)  # ints are accepted for floats


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    ("trian.steps=3", "unknown config section 'trian' in 'trian.steps'; did you mean 'train'?"),
    ("train.steps=abc", "train.steps = 'abc' should be a whole number"),
    ("train.steps=1.5", "train.steps = 1.5 should be a whole number"),
    ("train.steps=0", "train.steps = 0 must be positive"),
    ("model.family=bert", "model.family = 'bert' is not one of gpt2 | llama; pick one of those"),
    ("train.precision=fp8", "train.precision = 'fp8' is not one of fp32 | bf16 | fp16"),
    ("log.progress=1", "log.progress = 1 should be true or false"),
    ("model.heads=5", "model.hidden (256) must be a multiple of model.heads (5); try model.heads=4"),
    ("train.global_batch=10", "train.global_batch (10) must be a multiple of train.micro_batch (16)"),
    ("model.kv_heads=2", "grouped-query attention needs model.family=\"llama\""),
    ("train.device=tpu", "train.device = 'tpu' is not auto, cpu, cuda or cuda:N"),
    ("parallel.zero=4", "parallel.zero = 4 is not a ZeRO stage; use 0, 1, 2 or 3"),
    ("data.vocab_size=9000", "data.vocab_size (9000) exceeds model.vocab_size (4096)"),
    ("novalue", "--set 'novalue': expected section.key=value"),
])
def test_errors_name_key_value_and_fix(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_llama_gqa_contradiction():
    with pytest.raises(ConfigError, match=r"model.heads \(4\) must be a multiple of model.kv_heads \(3\)"):
        load_config(None, ["model.family=llama", "model.kv_heads=3"])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)
    flat = tmp_path / "flat.toml"
    flat.write_text("steps = 3")
    with pytest.raises(ConfigError, match=r"'steps': expected a \[steps\] table"):
        load_config(flat)


def test_override_value_parsing():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=hello world") == ("a.b", "hello world")
    assert parse_override("a.b=\"x=y\"") == ("a.b", "x=y")
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


def test_describe_lists_every_section():
    text = describe()
    for key in ["model.family", "data.sources", "train.global_batch", "parallel.tp", "checkpoint.every", "log.every"]:
        assert key in text


_text = st.text(alphabet=string.printable, max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.lists(_text, max_size=4))
def test_fuzz_overrides_never_traceback(items):
    try:
        load_config(None, items)
    except ConfigError as e:
        assert "\n" not in str(e)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_text, st.builds(lambda s, k, v: f"[{s}]\n{k} = {v}\n",
                                  st.sampled_from(["model", "train", "data", "log", "parallel", "x"]),
                                  st.sampled_from(["steps", "family", "hidden", "sources", "lr", "tp", "zzz"]),
                                  st.one_of(_text, st.integers().map(str), st.floats().map(repr),
                                            st.sampled_from(["true", "[1,2]", "{a=1}", '"gpt2"', "-3", "1e400"])))))
def test_fuzz_toml_never_traceback(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "c.toml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as e:
        assert "\n" not in str(e)


def test_docs_list_every_key():
    from pathlib import Path

    from megaloom.config import SECTIONS, keys_of

    doc = (Path(__file__).parents[2] / "docs" / "config.md").read_text()
    for section, typ in SECTIONS.items():
        for key in keys_of(typ):
            assert f"`{section}.{key}`" in doc, f"docs/config.md lacks {section}.{key}"


def test_huge_values_fail_fast():
    """Found by the fuzzer: the divisor suggestion once scanned every integer up to model.hidden."""
    import sys

    lines = [0]

    def count(frame, event, arg):  # lines executed in megaloom/config/: a count, not a clock
        if "megaloom/config/" in frame.f_code.co_filename.replace("\\", "/") and event == "line":
            lines[0] += 1
        return count

    sys.settrace(count)
    try:
        with pytest.raises(ConfigError, match="must be a multiple of model.heads"):
            load_config(None, ["model.hidden=1000000000000000001", "model.heads=7"])
    finally:
        sys.settrace(None)
    assert 0 < lines[0] < 100_000  # the divisor search looks at most 10,000 steps away
