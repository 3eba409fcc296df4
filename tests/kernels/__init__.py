"""Tests of esta_kernels (ops, backends, kernels, least squares, static kernel reports)."""
