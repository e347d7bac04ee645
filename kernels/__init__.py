"""tritongpt's Triton kernels, each with forward and backward.

`kernels.reference` holds the pure-torch versions (CPU path and test oracle).
Importing this package never touches the GPU.
"""
from kernels import reference
from kernels.attention import attention
from kernels.decode_attention import decode_attention
from kernels.ffn import ffn
from kernels.layer_norm import add_layer_norm, layer_norm

__all__ = ["reference", "attention", "decode_attention", "ffn", "layer_norm", "add_layer_norm"]
