import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A small prepared corpus (a slice of the standard library, 512-token BPE) shared by the tests."""
    from megaloom.data import prepare_corpus

    out = tmp_path_factory.mktemp("corpus") / "stdlib-512"
    prepare_corpus(["stdlib"], out, vocab_size=512, max_bytes=1_000_000, bpe_train_bytes=500_000,
                   val_fraction=0.2)
    return out
