"""The demo: a 0.8M-parameter GPT-2-style byte-level model on the embedded pydoc corpus (CPU, ~2 minutes).

Command:
    ziplm train --config experiments/configs/demo.py      (the same run as `ziplm demo`)

Expected (2-core CPU, Python 3.11's pydoc corpus): validation loss about 1.73 nats/byte (2.50 bits per byte) after
600 steps of 16 x 128 tokens; about 13k tokens/s.
"""

from research import config


def get_config():
    return config.base_config()
