"""A model a LightningModule uses but does not own.

Attribute assignment of an `nn.Module` registers it as a submodule: Lightning would then move it
between devices (its teardown sends the module tree to the CPU, a multi-GB round trip for a large
backbone), put its weights in the stage's checkpoint and switch its train/eval mode. A decoder
that a stage only reads (or whose few trainable weights the stage hands to its optimizer and
checkpoint itself) is held through this wrapper instead, outside the module tree.
"""
from __future__ import annotations


class Held:
    """`Held(model).model` is `model`, invisible to `nn.Module`'s registration."""

    def __init__(self, model):
        self.model = model
