"""The test suite, a package so that its shared helpers import as `tests.helpers` (pytest puts the repository
root on sys.path because this folder has an __init__.py; no `pythonpath` setting is needed).

    tests/kernels/   esta_kernels: the ops on every backend, the C++/CUDA/Triton kernels, least squares
    tests/esta/      the training layer: modules, model, calibration/PST/export, trainer, runs, serving, data
    tests/cli/       the `esta` command line
    tests/helpers/   shared inputs, tiny models and fake datasets (not tests)
"""
