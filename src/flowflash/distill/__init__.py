"""Distillation methods, one file each, behind the contract in base.py."""
from .base import Batch, DistillConfig, Method
from .dmd2 import DMD2
from .flash import Flash
from .naive import Naive
from .tg import TrajectoryGuidance

METHODS: dict[str, type[Method]] = {"flash": Flash, "dmd2": DMD2, "tg": TrajectoryGuidance, "naive": Naive}

__all__ = ["Batch", "DistillConfig", "METHODS", "Method"]
