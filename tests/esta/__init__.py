"""Tests of the training layer, the `esta` package."""
