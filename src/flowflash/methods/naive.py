"""`naive`: no training. The teacher sampled at the student's few steps (with its CFG): a table row."""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..models.flow_model import FlowModel
from .base import Method, refuse, set_fields
from .schedule import student_schedule
from .student import student_model


class Naive(Method):
    name = "naive"
    uses = frozenset({"method", "teacher", "student_steps", "student_shift", "schedule"})
    loop_fields = frozenset({"out"})  # it never runs the loop

    @classmethod
    def check_config(cls, cfg, loop_fields: set[str]):
        super().check_config(cfg, loop_fields)
        if cfg.schedule is not None:
            refuse(cls, set_fields(cfg, {"student_steps", "student_shift"}), " when an explicit schedule is given")

    def __init__(self, cfg, teacher: FlowModel, student=None):
        super().__init__(cfg, cfg.seed)
        self.teacher = teacher
        shift = cfg.student_shift if cfg.student_shift is not None else teacher.cfg.sampling.shift
        self.schedule = student_schedule(cfg.student_steps, shift, cfg.schedule)

    def export_model(self, weights: dict[str, Tensor] | None = None) -> FlowModel:
        """The teacher's own weights under the student schedule, keeping the teacher's CFG."""
        m = student_model(self.teacher, self.schedule, Path(self.cfg.out).name,
                          guidance=self.teacher.cfg.sampling.guidance)
        m.load_state_dict(self.teacher.state_dict())
        return m
