"""`flash`: the SD3.5-Flash recipe. Distribution matching with timestep sharing and the adversarial
heads (switches in the config, so ablations are configs); the trajectory-guidance warm start is a
`tg` run passed as `init_student`; split-timestep branches are `split: low|high` runs from the same
start, merged with `flowflash distill merge`."""
from __future__ import annotations

from .dmd import DistributionMatching


class Flash(DistributionMatching):
    name = "flash"
