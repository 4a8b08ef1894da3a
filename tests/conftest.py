import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """gpu-marked tests need a CUDA device; skip them (with the reason) when absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _private_user_data_dir(tmp_path_factory):
    """The planning data a developer made on this machine (flash-quant calibrate /
    measure-errors) must not change what the tests read: an empty user data directory."""
    old = os.environ.get("FLASH_QUANT_DATA_DIR")
    os.environ["FLASH_QUANT_DATA_DIR"] = str(tmp_path_factory.mktemp("user_data"))
    yield
    if old is None:
        os.environ.pop("FLASH_QUANT_DATA_DIR", None)
    else:
        os.environ["FLASH_QUANT_DATA_DIR"] = old


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random inputs each run (the standards ask for it), but reproducible on failure:
    # the seed is printed by pytest in the failing test's captured output, and
    # FQ_TEST_SEED=<seed> replays it (every test then draws from that seed).
    seed = int(os.environ.get("FQ_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    yield
