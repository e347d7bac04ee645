"""tritongpt's Triton kernels, each with forward and backward.

`kernels.reference` holds the pure-torch versions (CPU path and test oracle).
Importing this package never touches the GPU.
"""
from kernels import reference

__all__ = ["reference"]
