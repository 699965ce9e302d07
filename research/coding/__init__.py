"""Lossless coding: entropy-coded symbol streams (`entropy`), bit-exact float planes (`floats`), masks (`masks`),
the packed-model file (`container`) and the packing of a compressed model into it (`pack`)."""
