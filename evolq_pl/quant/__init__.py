"""Quantization primitives: bit types, fake quantizers, observers and quantized layers.

Nothing here knows timm or Lightning, so every piece is testable on toy tensors.
"""
