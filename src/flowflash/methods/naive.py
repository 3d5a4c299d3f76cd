"""`naive`: no training. The teacher sampled at the student's few steps (with its CFG): a table row."""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..models.flow_model import FlowModel
from .base import Method
from .student import check_steps, is_latent, refuse_schedule_overrides, schedule_from, student_model


class Naive(Method):
    name = "naive"
    uses = frozenset({"method", "teacher", "student_steps", "student_shift", "schedule"})
    loop_fields = frozenset({"out"})  # it never runs the loop

    @classmethod
    def check_config(cls, cfg, loop_fields: set[str]):
        super().check_config(cfg, loop_fields)
        refuse_schedule_overrides(cls, cfg)
        check_steps(cfg)

    def __init__(self, cfg, teacher: FlowModel, student=None):
        super().__init__(cfg, cfg.seed)
        self.teacher = teacher
        self.schedule = schedule_from(cfg, teacher)

    def save_export(self, weights, folder: Path) -> Path:
        if not is_latent(self.teacher):
            return super().save_export(weights, folder)
        from ..release.sd3_student import save_sd3_student
        return save_sd3_student(self.teacher.cfg, self.teacher.state_dict(), self.schedule,
                                self.teacher.cfg.sampling.guidance, None, folder)

    def export_model(self, weights: dict[str, Tensor] | None = None) -> FlowModel:
        """The teacher's own weights under the student schedule, keeping the teacher's CFG."""
        m = student_model(self.teacher, self.schedule, Path(self.cfg.out).name,
                          guidance=self.teacher.cfg.sampling.guidance)
        m.load_state_dict(self.teacher.state_dict())
        return m
