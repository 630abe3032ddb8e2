"""Errors of the model layer, in their own module so checkpoint and vocabulary both import them without
importing each other (vocabulary raised ModelError from checkpoint, which imports vocabulary)."""
from __future__ import annotations


class ModelError(RuntimeError):
    """The model, its weights or its text encoder cannot be used as configured; the text says why."""


class CheckpointError(ModelError):
    """A checkpoint file that cannot be loaded (missing, corrupt, other format, mismatching weights)."""


class NonFiniteOutputError(ModelError):
    """The model gave NaN for a frame (NaN weights, an overflow): the frame has no usable result; ``outputs`` names
    which of its outputs."""

    def __init__(self, outputs: list[str]):
        super().__init__(f"non-finite model outputs: {', '.join(outputs)}")
        self.outputs = outputs
