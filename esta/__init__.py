"""esta: the training layer of Efficient Stitchable Task Adaptation.

    esta.nn.StitchedLinear   a drop-in nn.Linear with a shared LoRA and one bias row per stitch
    esta.nn.StitchingLayer   the linear map between two anchors
    esta.stitch_positions    SN-Net's stitch positions of one anchor pair (esta.positions)
    esta.TimmViTAnchor, esta.SequentialBlocksAnchor, esta.HFCausalLMAnchor   anchors (embed -> blocks -> head);
                             the last wraps a Hugging Face decoder LM (esta.hf: what its layers are given)
    esta.StitchableModel     anchors plus the stitches between them, with parameter and FLOPs counts,
                             least-squares init of the stitching layers (esta.calibration), PST conversion
                             (esta.pst) and merged export (esta.export)
    esta.generate            greedy / top-p / beam-search generation of decoder members with a key/value cache
                             per segment (esta.generation)
    esta.TaskSpecificSampler ESTA's stitch sampling by SNIP importance (esta.sampling)
    esta.Trainer             one-stage adapt-and-stitch training (esta.train); evaluation in esta.evaluate,
                             deployment in esta.deploy, process groups in esta.distributed; run directories
                             in esta.runs, their configuration in esta.config; the `esta` command line in
                             esta.cli
    esta.datasets            image data as the anchors expect it: timm data configs, the paper's
                             augmentation recipes, named datasets (FGVC, CIFAR-100, VTAB-1k) from local files
    esta.presets, esta.sweep, esta.multitask   the paper's recipes (configs/), the lr grid on the validation
                             split, several tasks per FLOPs interval and group
    esta.serving             palette serving: every deployed member from one set of weights, mixed-stitch
                             batches, budget routing, `esta serve` (imported on its own: `from esta.serving
                             import Palette`)

The kernels live in `esta_kernels`; `esta` builds on them (never the reverse).
"""
from esta import export, nn
from esta.anchors import Anchor, HFCausalLMAnchor, SequentialBlocksAnchor, TimmViTAnchor
from esta.generation import generate
from esta.model import StitchableModel, StitchInfo
from esta.positions import StitchPosition, stitch_positions
from esta.sampling import TaskSpecificSampler, snip_score
from esta.train import Trainer, TrainConfig

__version__ = "0.1.0"

__all__ = ["export", "nn", "Anchor", "SequentialBlocksAnchor", "TimmViTAnchor", "HFCausalLMAnchor", "generate",
           "StitchableModel", "StitchInfo",
           "StitchPosition", "stitch_positions", "TaskSpecificSampler", "snip_score", "Trainer", "TrainConfig"]
