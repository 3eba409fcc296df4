"""Tests of the `esta` command line (esta.cli)."""
