"""Fixtures shared by the model tests."""

from tests.model.graph_standin import captures  # noqa: F401  (the CPU stand-in for CUDA graph capture and replay)
