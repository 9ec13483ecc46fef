"""Quantized weights kept in their GGUF block formats, and the matmuls that use them.

formats.py  the block types: sizes, and dequantization in PyTorch (the portable path)
kernels.py  one dispatch point: the AVX2 C++ extension when it builds, else PyTorch
modules.py  QuantLinear and QuantEmbedding, drop-in replacements for nn.Linear / nn.Embedding
"""
