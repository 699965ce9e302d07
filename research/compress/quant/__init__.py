"""Weight quantization: uniform integer grids (`grid`), fake quantization with a clipped straight-through gradient
(`fake`), round-to-nearest post-training quantization (`rtn`) and quantization-aware training (`qat`).

Every method is a `core.Transform`; codes are uint8 in [0, 2**bits - 1] and dequantize as (code - zero) * scale.
"""
