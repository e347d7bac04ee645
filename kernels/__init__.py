"""tritongpt's Triton kernels, each with forward and backward (decode attention and sampling,
which serve generation only, forward only).

`kernels.reference` holds the pure-torch versions (CPU path and test oracle).
Importing this package never touches the GPU.

Each public function is opaque to torch.compile (torch.compiler.disable): Dynamo breaks
the graph around it and runs it as it is. Traced into, the launches failed to compile in
Inductor on an H200 (torch 2.11, a decode step), and the interpreter cannot be traced at all.
"""
from kernels import reference
from kernels._utils import FLOAT_DTYPES, HEAD_DIMS, LAYER_NORM_MAX_ROW_BYTES
from kernels.attention import attention
from kernels.decode_attention import decode_attention
from kernels.ffn import ffn
from kernels.layer_norm import add_layer_norm, layer_norm
from kernels.sampling import sample

__all__ = ["FLOAT_DTYPES", "HEAD_DIMS", "LAYER_NORM_MAX_ROW_BYTES", "reference", "attention", "decode_attention", "ffn", "layer_norm", "add_layer_norm", "sample"]
