"""Training methods behind one contract (base.py): `rf` trains a teacher; `tg`, `dmd2`, `flash` distil a
few-step student from it; `naive` is the untrained few-step baseline."""
from .base import Method, StepOutput
from .dmd2 import DMD2
from .flash import Flash
from .naive import Naive
from .rf import RectifiedFlow
from .tg import TrajectoryGuidance

DISTILL_METHODS: dict[str, type[Method]] = {"flash": Flash, "dmd2": DMD2, "tg": TrajectoryGuidance, "naive": Naive}
METHODS: dict[str, type[Method]] = {"rf": RectifiedFlow, **DISTILL_METHODS}

__all__ = ["DISTILL_METHODS", "METHODS", "Method", "StepOutput"]
