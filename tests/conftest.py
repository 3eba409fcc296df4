"""Test configuration.

Without a GPU, the Triton kernels run on CPU tensors under the Triton interpreter: TRITON_INTERPRET=1 must
be set before triton is first imported, so it is set here, before any test module imports esta_kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import esta_kernels  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.sh runs these on a lent one)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def poison_empty():
    """Makes torch.empty (and ATen's at::empty in the C++ kernels) fill new float tensors with NaN, so an
    output element a kernel forgets to write fails the comparison."""
    import torch.utils.deterministic as det

    prev_mode = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        det.fill_uninitialized_memory = prev_fill
        torch.use_deterministic_algorithms(prev_mode, warn_only=prev_warn)
