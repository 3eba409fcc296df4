"""Neural-network layers of esta."""
from esta.nn.stitched_linear import StitchedLinear

__all__ = ["StitchedLinear"]
