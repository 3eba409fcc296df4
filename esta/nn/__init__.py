"""Neural-network layers of esta."""
from esta.nn.stitched_linear import StitchedLinear
from esta.nn.stitching import StitchingLayer

__all__ = ["StitchedLinear", "StitchingLayer"]
