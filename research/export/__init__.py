"""Exports for other runtimes: a model, compressed or not, written in the formats models are deployed in.

    ziplm export --model SRC --out DIR                                     # Hugging Face safetensors of floats
    ziplm export --model SRC --format gguf --out m.gguf [--type auto|q4_0|...]   # llama.cpp (`gguf`, `blocks`)
    ziplm export --model SRC --format compressed-tensors --out DIR         # vLLM / transformers (`compressed_tensors`)

A compressed model's grid codes (`pack.codes_of` of its `.zlm`) are written as they are wherever the format can hold
them exactly, and what it cannot hold is refused with the leaf and the reason (or, for GGUF, rounded with
`--requantize`, and reported). The Hugging Face export lives with the importer in `research.models.hf`.
"""
