"""esta: the training layer of Efficient Stitchable Task Adaptation.

    esta.nn.StitchedLinear   a drop-in nn.Linear with a shared LoRA and one bias row per stitch

The kernels live in `esta_kernels`; `esta` builds on them (never the reverse).
"""
from esta import nn

__version__ = "0.1.0"

__all__ = ["nn"]
