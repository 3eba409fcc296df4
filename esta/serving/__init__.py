"""Palette serving: every deployed member of a trained run from one set of weights.

    esta.serving.Palette        merged anchors + stitching layers + per-member bias rows; mixed-stitch
                                forward `palette(inputs, members)`, budget routing `palette.route(...)`
    esta.serving.Batcher        a dynamic batcher forming mixed-stitch batches from concurrent requests
    esta.serving.serve_run      `esta serve`: the HTTP JSON server (esta.serving.server)

Details and the design: docs/serving.md.
"""
from esta.serving.palette import (BudgetError, Palette, PaletteError, PaletteMember, Route, RowBiasLinear,
                                  UnknownMemberError)

__all__ = ["Palette", "PaletteMember", "Route", "RowBiasLinear", "PaletteError", "UnknownMemberError",
           "BudgetError"]
