"""`dmd2`: the baseline. Distribution matching at a random t on re-noised end-points (fresh noise),
with the same critic, adversarial heads and update ratio as `flash`."""
from __future__ import annotations

import dataclasses

from .dmd import DistributionMatching


class DMD2(DistributionMatching):
    name = "dmd2"

    def __init__(self, cfg, teacher, student=None, critic=None):
        super().__init__(dataclasses.replace(cfg, timestep_sharing=False), teacher, student, critic)
