"""pytest-benchmark configuration for bench/: records the software and threads beside every result."""
import os
import platform

import torch

# set by `python -m bench.compare --threads N`
if os.environ.get("ESTA_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["ESTA_BENCH_THREADS"]))


def pytest_benchmark_update_machine_info(config, machine_info):
    import esta_kernels

    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["esta_backends"] = esta_kernels.available_backends()
    machine_info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    machine_info["python"] = platform.python_version()
