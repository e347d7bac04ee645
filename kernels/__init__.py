"""tritongpt's Triton kernels, each with forward and backward (decode attention and sampling,
which serve generation only, forward only).

`kernels.reference` holds the pure-torch versions (CPU path and test oracle).
Importing this package never touches the GPU.

Under torch.compile, attention, layer_norm, add_layer_norm, ffn and linear_cross_entropy run as custom ops
(torch.library.custom_op, namespace "tritongpt", with fake implementations and their
backward as ops too): Dynamo and Inductor take them into one graph without tracing into
the launches, which failed to compile in Inductor on an H200 (torch 2.11, a decode step)
and which the interpreter cannot trace at all. Eager calls skip the op dispatch (~17 us a
call). decode_attention and sample, which generation replays in CUDA graphs of its own,
stay opaque (torch.compiler.disable): Dynamo breaks the graph around them.

Without Triton 3.6 or newer (macOS, Windows, torch's CPU wheels) the package holds
`reference` alone, which is what the model runs there; `TRITON_MISSING` says why, and
asking for a kernel raises an ImportError that says so.
"""
from kernels import reference
from kernels._utils import FLOAT_DTYPES, HEAD_DIMS, LAYER_NORM_MAX_ROW_BYTES, TRITON_MISSING

_KERNELS = ("attention", "decode_attention", "ffn", "layer_norm", "add_layer_norm", "linear_cross_entropy", "sample")

if TRITON_MISSING is None:
    from kernels.attention import attention
    from kernels.cross_entropy import linear_cross_entropy
    from kernels.decode_attention import decode_attention
    from kernels.ffn import ffn
    from kernels.layer_norm import add_layer_norm, layer_norm
    from kernels.sampling import sample


def __getattr__(name: str) -> object:
    # Reached only for names the imports above did not bind.
    if name in _KERNELS:
        raise ImportError(f"kernels.{name} cannot run here: {TRITON_MISSING}; kernels.reference holds the torch "
                          "versions (the model's --kernels torch)")
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


__all__ = ["FLOAT_DTYPES", "HEAD_DIMS", "LAYER_NORM_MAX_ROW_BYTES", "TRITON_MISSING", "reference", *_KERNELS]
