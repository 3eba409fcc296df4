"""esta: the training layer of Efficient Stitchable Task Adaptation.

    esta.nn.StitchedLinear   a drop-in nn.Linear with a shared LoRA and one bias row per stitch
    esta.nn.StitchingLayer   the linear map between two anchors
    esta.stitch_positions    SN-Net's stitch positions of one anchor pair (esta.positions)
    esta.TimmViTAnchor, esta.SequentialBlocksAnchor   anchors (embed -> blocks -> head)
    esta.StitchableModel     anchors plus the stitches between them, with parameter and FLOPs counts,
                             least-squares init of the stitching layers (esta.calibration), PST conversion
                             (esta.pst) and merged export (esta.export)
    esta.TaskSpecificSampler ESTA's stitch sampling by SNIP importance (esta.sampling)
    esta.Trainer             one-stage adapt-and-stitch training (esta.train); evaluation in esta.evaluate,
                             deployment in esta.deploy, process groups in esta.distributed; run directories
                             in esta.runs, their configuration in esta.config; the `esta` command line in
                             esta.cli
    esta.serving             palette serving: every deployed member from one set of weights, mixed-stitch
                             batches, budget routing, `esta serve` (imported on its own: `from esta.serving
                             import Palette`)

The kernels live in `esta_kernels`; `esta` builds on them (never the reverse).
"""
from esta import export, nn
from esta.anchors import Anchor, SequentialBlocksAnchor, TimmViTAnchor
from esta.model import StitchableModel, StitchInfo
from esta.positions import StitchPosition, stitch_positions
from esta.sampling import TaskSpecificSampler, snip_score
from esta.train import Trainer, TrainConfig

__version__ = "0.1.0"

__all__ = ["export", "nn", "Anchor", "SequentialBlocksAnchor", "TimmViTAnchor", "StitchableModel", "StitchInfo",
           "StitchPosition", "stitch_positions", "TaskSpecificSampler", "snip_score", "Trainer", "TrainConfig"]
