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


# Files whose tests run longest (minutes of subprocesses: many processes, interrupted runs, the demo) go first, so
# that pytest-xdist's per-file scheduling (`make test`: --dist loadfile --no-loadscope-reorder, which keeps this
# order instead of sorting files by their number of tests) starts them while the short files fill the other
# workers, instead of leaving one worker busy at the end of the run.
SLOW_FIRST = (
    "tests/train/test_multiprocess.py",
    "tests/compress/test_finetune_resume.py",
    "tests/test_cli.py",
    "tests/train/test_resume.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept
