"""Test setup: 8 forced CPU devices (for sharding tests), W&B disabled, a private token cache."""

import os

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    os.environ.setdefault("ZIPLM_REAL_CACHE", os.environ.get("ZIPLM_CACHE", os.path.expanduser("~/.cache/ziplm")))
    os.environ["ZIPLM_CACHE"] = str(tmp_path_factory.mktemp("ziplm-cache"))
