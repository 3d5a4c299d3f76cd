"""What the distillation methods share: the frozen teacher, the trainable student, the student's
few-step schedule (and the split branch's part of it), the student's own rollout, and the export of a
student model folder that records its schedule."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import FlowflashError
from ..models.flow_model import FlowModel
from ..models.protocol import SamplingDefaults, check_schedule
from ..sampling import euler_step, sample, x0_from_v
from ..train.common import load_cast
from ..train.data import Batch
from .base import Method, full_t, refuse, set_fields, velocity
from .schedule import split_range, steps_in_range, student_schedule

# Fields every distillation method reads (the loop's are allowed everywhere).
STUDENT_FIELDS = frozenset({"method", "teacher", "init_student", "student_steps", "student_shift", "schedule",
                            "split", "split_at", "guidance", "prompts", "size", "drop", "max_sequence_length",
                            "embed_cache", "fsdp", "grad_checkpointing", "step_per_sample", "p_single", "concepts",
                            "p_phrasing", "teacher_prompt", "also_steps", "also_times"})
EMOJI_DATA_FIELDS = frozenset({"p_single", "concepts", "p_phrasing", "teacher_prompt"})
LATENT_FIELDS = frozenset({"prompts", "size", "drop", "max_sequence_length", "real_images", "embed_cache"})


def is_latent(teacher) -> bool:
    """Whether the teacher is an SD3 pipeline's transformer (models/latent.py), not an emoji model."""
    from ..models.latent import LatentFlow
    return isinstance(teacher, LatentFlow)


def student_model(teacher: FlowModel, schedule: list[float], name: str, guidance: float = 1.0,
                  others: list[list[float]] = ()) -> FlowModel:
    """A model with the teacher's architecture whose sampling defaults are the student's schedule (no CFG), and
    the other schedules the same weights were trained at (also_steps). It knows the teacher's styles but does not
    take its default style: completion is judged per model (docs/benchmarks.md, the tenth look)."""
    sampling = SamplingDefaults(steps=len(schedule) - 1, guidance=guidance, shift=teacher.cfg.sampling.shift,
                                schedule=tuple(schedule), other_schedules=tuple(tuple(o) for o in others),
                                styles=teacher.cfg.sampling.styles)
    return FlowModel(dataclasses.replace(teacher.cfg, kind="student", name=name, sampling=sampling))


def schedule_from(cfg, teacher) -> list[float]:
    """The student's times: explicit, or student_steps shifted by student_shift (default: the teacher's). For an
    SD3 teacher they are the sigmas its FlowMatchEulerDiscreteScheduler gives for student_steps (with
    student_shift, when set, in place of its shift), so that the exported student runs in vanilla diffusers."""
    if is_latent(teacher):
        from ..models.sd3 import load_scheduler, scheduler_sigmas

        if cfg.schedule is not None:
            raise FlowflashError("an SD3 teacher's student takes its scheduler's times (so that vanilla diffusers "
                                 "runs the export); set student_steps and, if needed, student_shift, not schedule")
        check_steps(cfg)
        sched = load_scheduler(teacher.cfg.folder)
        if cfg.student_shift is not None:
            sched = type(sched).from_config({**sched.config, "shift": float(cfg.student_shift)})
        c = teacher.cfg
        p = teacher.transformer.config.patch_size
        seq = (c.latent_shape[1] // p) * (c.latent_shape[2] // p)
        return [float(t) for t in scheduler_sigmas(sched, cfg.student_steps, seq)]
    shift = cfg.student_shift if cfg.student_shift is not None else teacher.cfg.sampling.shift
    return student_schedule(cfg.student_steps, shift, cfg.schedule)


def check_steps(cfg):
    """The student's step count and shift, checked before anything is built."""
    if not isinstance(cfg.student_steps, int) or cfg.student_steps < 1:
        raise FlowflashError(f"student_steps must be an integer >= 1, got {cfg.student_steps!r}")
    also = cfg.also_steps
    if also is not None:
        if not also or any(not isinstance(k, int) or k < 1 for k in also):
            raise FlowflashError(f"also_steps lists step counts >= 1, got {also!r}")
        if cfg.student_steps in also or len(set(also)) != len(also):
            raise FlowflashError(f"also_steps {also} must not repeat a step count or student_steps "
                                 f"({cfg.student_steps})")
    if cfg.also_times is not None:
        if also is None:
            raise FlowflashError("also_times gives the times of also_steps' counts: set also_steps too")
        if len(cfg.also_times) != len(also) or any(
                not isinstance(t, list) or len(t) != k + 1 for t, k in zip(cfg.also_times, also)):
            raise FlowflashError(f"also_times lists one schedule per count of also_steps {also}, each of count + 1 "
                                 f"times; got {cfg.also_times!r}")
        for t in cfg.also_times:
            check_schedule(t)
    if cfg.student_shift is not None and not cfg.student_shift > 0:
        raise FlowflashError(f"student_shift must be > 0, got {cfg.student_shift!r}")


def refuse_schedule_overrides(method: type[Method], cfg):
    if cfg.schedule is not None:
        refuse(method, set_fields(cfg, {"student_steps", "student_shift", "also_steps", "also_times"}),
               " when an explicit schedule is given")


def all_schedules(cfg, teacher, first: list[float]) -> list[list[float]]:
    """The schedule the student exports (`first`), then one per count of also_steps: the same shift, so that
    `--steps K` at sampling time visits exactly the times it was trained at."""
    if not cfg.also_steps:
        return [first]
    if is_latent(teacher):
        raise FlowflashError("also_steps: only for an emoji teacher; an SD3 student's folder runs one scheduler's "
                             "steps in diffusers")
    shift = cfg.student_shift if cfg.student_shift is not None else teacher.cfg.sampling.shift
    times = cfg.also_times or [None] * len(cfg.also_steps)
    return [first] + [student_schedule(k, shift, t) for k, t in zip(cfg.also_steps, times)]


class StudentMethod(Method):
    uses: ClassVar[frozenset[str]] = STUDENT_FIELDS

    def __init__(self, cfg, teacher: FlowModel, student: FlowModel | None = None):
        super().__init__(cfg, cfg.seed + 17)
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = (student if student is not None else copy.deepcopy(teacher)).train().requires_grad_(True)
        self.schedule = schedule_from(cfg, teacher)
        # also_steps: each sample draws one of several schedules (the same weights then run at each count);
        # a table padded with zeros (a step past a schedule's end has dt = 0) indexed by (schedule, step)
        self.schedules = all_schedules(cfg, teacher, self.schedule)
        width = max(len(s) for s in self.schedules)
        self.table = torch.tensor([s + [0.0] * (width - len(s)) for s in self.schedules], dtype=torch.float64)
        self.n_steps = torch.tensor([len(s) - 1 for s in self.schedules])
        self.cur_sched: Tensor | None = None  # each sample's schedule index, set by pick_steps / final_samples
        lo, hi = split_range(cfg.split, cfg.split_at)
        self.train_steps = steps_in_range(self.schedule, lo, hi)
        self.networks = {"student": self.student}

    @classmethod
    def check_config(cls, cfg, loop_fields: set[str]):
        super().check_config(cfg, loop_fields)
        refuse_schedule_overrides(cls, cfg)
        check_steps(cfg)
        if cfg.split is None:
            refuse(cls, set_fields(cfg, {"split_at"}), " without a split branch")
        if cfg.also_steps:
            refuse(cls, set_fields(cfg, {"split"}) + (["step_per_sample"] if not cfg.step_per_sample else []),
                   " with also_steps (each sample draws its own schedule)")

    @property
    def mixed(self) -> bool:
        return len(self.schedules) > 1

    def _global_rand(self, n: int) -> Tensor:
        """Uniform draws for the global batch (every rank's generator alike); a rank keeps `self._rows(...)`."""
        return torch.rand((n * (self.draw_slice or (0, 1))[1],), generator=self.gen)

    def _rows(self, x: Tensor, n: int) -> Tensor:
        r = (self.draw_slice or (0, 1))[0]
        return x[r * n: (r + 1) * n]

    def _draw_schedules(self, n: int) -> Tensor:
        """Under also_steps: a schedule index per sample of the global batch, uniformly."""
        k = len(self.schedules)
        return (self._global_rand(n) * k).long().clamp(max=k - 1)

    def pick_steps(self, n: int) -> Tensor:
        """Student step indices for n samples (restricted to the split's range): one per sample, or with
        step_per_sample false one for the whole batch (the old behaviour, an ablation arm). Every rank rolls
        out as deep as the deepest sample of the global batch (`self.depth`): sharded roles gather their
        weights once per forward, so all ranks must run the same number of forwards."""
        if self.mixed:  # a schedule per sample, then a step of it
            s = self._draw_schedules(n)
            i = torch.minimum((self._global_rand(n) * self.n_steps[s]).long(), self.n_steps[s] - 1)
            self.depth = int(i.max())
            self.cur_sched = self._rows(s, n).to(self.device)
            return self._rows(i, n).to(self.device)
        steps = torch.tensor(self.train_steps)
        if self.cfg.step_per_sample:
            j = (self._global_rand(n) * len(steps)).long().clamp(max=len(steps) - 1)
            self.depth = int(steps[j].max())
            j = self._rows(j, n)
        else:
            j = torch.randint(len(steps), (1,), generator=self.gen).expand(n)
            self.depth = int(steps[j[0]])
        return steps[j].to(self.device)

    def times(self, i: Tensor, like: Tensor, offset: int = 0) -> Tensor:
        """t_{i + offset} per sample, in like's dtype (at least fp32) and on its device."""
        dtype = like.dtype if torch.finfo(like.dtype).bits >= 32 else torch.float32
        if self.mixed:
            return self.table.to(like.device)[self.cur_sched, i + offset].to(dtype)
        sched = torch.tensor(self.schedule, dtype=torch.float64, device=like.device)
        return sched[i + offset].to(dtype)

    @torch.no_grad()
    def final_samples(self, b: Batch) -> Tensor:
        """The student's samples at t = 0; under also_steps each sample runs its own drawn schedule."""
        if not self.mixed:
            return self.rollout(b, len(self.schedule) - 1)
        n = b.noise.shape[0]
        s = self._draw_schedules(n)
        self.depth = int(self.n_steps[s].max())
        s = self._rows(s, n)
        self.cur_sched = s.to(self.device)
        return self.rollout(b, self.n_steps[s].to(self.device))

    @torch.no_grad()
    def rollout(self, b: Batch, upto: Tensor | int) -> Tensor:
        """The student's own state at t_upto (per sample), reached from the noise by its own Euler steps."""
        if not torch.is_tensor(upto):
            ts = torch.tensor(self.schedule[: upto + 1], dtype=torch.float64)
            return sample(lambda x, t: velocity(self.student, x, t, b), b.noise, ts)
        x, states = b.noise, [b.noise]
        depth = max(int(upto.max()), getattr(self, "depth", 0))
        # each sample's own times under also_steps (past its schedule's end: t = t_next = 0, no move)
        own = self.table.to(x.device)[self.cur_sched].to(torch.float32) if self.mixed else None
        for k in range(depth):  # every sample through the deepest index drawn; each keeps its own
            if self.mixed:
                t0, t1 = own[:, k], own[:, k + 1]
                t = t0.to(x.dtype) if torch.finfo(x.dtype).bits >= 32 else t0
                x = euler_step(x, velocity(self.student, x, t, b), t0, t1)
            else:
                t = full_t(x, self.schedule[k])
                x = euler_step(x, velocity(self.student, x, t, b), self.schedule[k], self.schedule[k + 1])
            states.append(x)
        return torch.stack(states)[upto, torch.arange(x.shape[0], device=x.device)]

    def student_x0(self, b: Batch, i: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x_{t_i}, v_student with grad, x0_hat with grad) at student steps i (one per sample)."""
        x = self.rollout(b, i)
        t = self.times(i, x)
        v = velocity(self.student, x, t, b)
        return x, v, x0_from_v(x, t, v)

    def export_model(self, weights: dict[str, Tensor]) -> FlowModel:
        return load_cast(student_model(self.teacher, self.schedule, Path(self.cfg.out).name,
                                       others=self.schedules[1:]), weights)

    def save_export(self, weights: dict[str, Tensor], folder: Path) -> Path:
        if not is_latent(self.teacher):
            return super().save_export(weights, folder)
        from ..release.sd3_student import save_sd3_student
        return save_sd3_student(self.teacher.cfg, weights, self.schedule, 1.0, self.cfg, folder)
