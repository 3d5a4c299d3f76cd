"""`naive`: no training. The teacher sampled at the student's few steps (with its CFG): a table row."""
from __future__ import annotations

from .base import Method


class Naive(Method):
    name = "naive"
    trainable = ()

    def train_step(self, batch, step):
        raise RuntimeError("naive has no training step: export the teacher with the student schedule")
