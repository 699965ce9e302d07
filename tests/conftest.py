"""Test setup: 8 forced CPU devices (for sharding tests), W&B disabled, a private token cache, and one JAX
compilation cache for the whole run.

Most of the suite's time is XLA compiling tiny models' programs, many of them the same program again: in another
test, the other pytest-xdist worker, or one of the `python -m research ...` subprocesses the CLI tests start. The
controller creates one temporary persistent compilation cache before the workers start; they and their
subprocesses inherit it through the environment (JAX reads `JAX_COMPILATION_CACHE_DIR` at import), so a program is
compiled once per run (757 tests on 2 cores: 897 s -> 725 s). A cached executable is the one XLA would compile
again, so results are unchanged. The cache has no size limit, which keeps JAX's per-write scan of the whole
directory (quadratic in its thousands of entries) and its lock off; a reader that meets an entry still being
written gets a decompression error, and JAX compiles instead (its warning is silenced for the subprocesses). The
directory goes when the run ends; set `ZIPLM_TEST_JAX_CACHE` to a directory of your own to keep one across runs.
"""

import os
import shutil
import tempfile

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if "ZIPLM_TEST_JAX_CACHE" not in os.environ:  # the controller (or a plain run): workers inherit its choice
    os.environ["ZIPLM_TEST_JAX_CACHE"] = _OWN_JAX_CACHE = tempfile.mkdtemp(prefix="ziplm-test-jax-cache-")
else:
    _OWN_JAX_CACHE = None
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["ZIPLM_TEST_JAX_CACHE"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = "-1"
_QUIET = "ignore:Error reading persistent compilation cache entry"  # a torn read: JAX compiles instead
if _QUIET not in os.environ.get("PYTHONWARNINGS", ""):
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), _QUIET]))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402


def pytest_unconfigure(config):
    if _OWN_JAX_CACHE and not hasattr(config, "workerinput"):
        shutil.rmtree(_OWN_JAX_CACHE, ignore_errors=True)


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
    "tests/compress/test_calib_resume.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept
