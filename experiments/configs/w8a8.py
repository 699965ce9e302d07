"""Weight and activation quantization (W8A8, W4A8) on the Tiny Shakespeare model.

Commands (the model is the run of `ziplm train --config experiments/configs/shakespeare_char_cpu.py`):
    ziplm compress --config experiments/configs/w8a8.py           # W8A8: 8-bit GPTQ per channel, 8-bit activations
    ziplm compress --config experiments/configs/w8a8.py:4         # W4A8: 4-bit GPTQ, groups of 32
    ziplm compress --config experiments/configs/w8a8.py:4 --config.compress.1.bits=4   # W4A4

GPTQ quantizes the block linear kernels (128 calibration windows of 64 characters), then the act_quant entry
fake-quantizes the input of every block linear layer per token on a symmetric max-abs grid
(`research.models.act_quant`): the saved model runs with quantized activations wherever it is loaded.

Expected (validation loss, nats/char; dense 1.8260 on the study model retrained on the 2-core CPU machine):
W8A8 1.8260, W4A8 1.8272, W4A4 1.9176 (4-bit activations cost 0.09 nats; 8-bit ones nothing measurable).
About a minute each on 2 CPU cores.
"""

from pathlib import Path

from research.compress import pipeline

ROOT = Path(__file__).resolve().parents[2]


def get_config(weight_bits: str = "8"):
    bits = int(weight_bits)
    gptq = dict(method="gptq", bits=bits, granularity="channel", symmetric=True, group_fit="sweep")
    if bits < 8:
        gptq.update(granularity="group", group_size=32)
    c = pipeline.base_config()
    c.model = str(ROOT / "runs" / "shakespeare_char_cpu")
    c.compress = [gptq, dict(method="act_quant", bits=8)]
    c.calibration.update(n=128, length=64, batch_size=32)
    c.eval.batch_size = 256
    return c
