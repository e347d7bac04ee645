"""tritongpt's Triton kernels, each with forward and backward (decode attention and sampling,
which serve generation only, forward only).

`kernels.reference` holds the pure-torch versions (CPU path and test oracle).
Importing this package never touches the GPU.

Under torch.compile, attention, layer_norm, add_layer_norm and ffn run as custom ops
(torch.library.custom_op, namespace "tritongpt", with fake implementations and their
backward as ops too): Dynamo and Inductor take them into one graph without tracing into
the launches, which failed to compile in Inductor on an H200 (torch 2.11, a decode step)
and which the interpreter cannot trace at all. Eager calls skip the op dispatch (~17 us a
call). decode_attention and sample, which generation replays in CUDA graphs of its own,
stay opaque (torch.compiler.disable): Dynamo breaks the graph around them.
"""
from kernels import reference
from kernels._utils import FLOAT_DTYPES, HEAD_DIMS, LAYER_NORM_MAX_ROW_BYTES
from kernels.attention import attention
from kernels.decode_attention import decode_attention
from kernels.ffn import ffn
from kernels.layer_norm import add_layer_norm, layer_norm
from kernels.sampling import sample

__all__ = ["FLOAT_DTYPES", "HEAD_DIMS", "LAYER_NORM_MAX_ROW_BYTES", "reference", "attention", "decode_attention", "ffn", "layer_norm", "add_layer_norm", "sample"]
