"""Helpers shared by the tests, imported as `from tests.helpers.inputs import make_inputs` and so on.

    inputs         random inputs and float64 references of the stitched linear; Triton test marks
    devices        the device axis of kernel tests: cpu always, cuda cases marked `gpu`
    models         tiny timm ViTs, generic MLP anchors, the 3-anchor StitchableModel, gradient recording
    fake_datasets  tiny fake copies of the vision datasets' layouts; an image folder
    instructions   tiny Llama families saved as HF directories, a trained tokenizer, instruction-run configs
    config_keys    one dotted key of a config dict set; the bad-value cases of a key table; run-directory snapshots
    ranks          multi-process gloo tests: a module's `_worker` on N processes
    gpu_matrix     the GPU correctness matrix, run per group as `python -m tests.helpers.gpu_matrix`

This module imports nothing heavy: gpu_matrix sets Triton's environment before torch or triton load.
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The repository root (for subprocesses' cwd and PYTHONPATH, and files such as configs/)."""
