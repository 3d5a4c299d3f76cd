"""The model worker: one thread owns the loaded pipelines and runs jobs from a bounded queue.

Jobs that wait together with the same settings (model, steps, guidance, size, negative prompt; no init image)
run as one batched denoising call, so concurrent clients share the model's forward passes. Every job keeps a
list of events (queued, step with a preview, done, failed, cancelled) that the HTTP layer streams or waits on.
"""
from __future__ import annotations

import base64
import io
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from PIL import Image

from ..errors import FlowflashError
from ..runtime.pipeline import Pipeline

TERMINAL = ("done", "failed", "cancelled")


class QueueFull(Exception):
    """More jobs wait than the server accepts (HTTP 429 with Retry-After)."""


class Cancelled(Exception):
    """Raised from a step callback to stop a batch whose jobs were all cancelled."""


@dataclass(frozen=True)
class JobSpec:
    """What a client asked for, already validated by the HTTP layer."""
    prompt: str
    model: str
    n: int = 1
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    size: tuple[int, int] | None = None
    negative_prompt: str | None = None
    init_image: Image.Image | None = field(default=None, compare=False)
    strength: float = 0.8
    previews: bool = True
    complete_style: bool = True  # False: a prompt naming no style is drawn as typed (Pipeline.complete)

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can share one denoising call; img2img jobs run alone."""
        if self.init_image is not None:
            return None
        return (self.model, self.steps, self.guidance, self.size, self.negative_prompt, self.complete_style)


@dataclass
class Job:
    id: str
    spec: JobSpec
    created: float = field(default_factory=time.time)
    status: str = "queued"
    events: list[dict] = field(default_factory=list)
    pngs: list[str] = field(default_factory=list)  # the finished images, base64 PNG, encoded once
    seeds: list[int] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    error: str | None = None
    step: int = 0
    steps: int = 0
    preview_png: str | None = None  # the latest preview, base64 PNG
    cancel_requested: bool = False
    listeners: list = field(default_factory=list, repr=False)  # called (from the worker) on each new event

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def preview_strip(images: list[Image.Image], height: int = 64) -> Image.Image:
    """A job's current predictions side by side, at most `height` px high: small enough to stream each step."""
    w, h = images[0].size
    scale = min(1.0, height / h)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    strip = Image.new("RGB", (tw * len(images), th))
    for i, im in enumerate(images):
        strip.paste(im.resize((tw, th), Image.BILINEAR), (i * tw, 0))
    return strip


class Worker:
    """Owns the pipelines; `submit` from any thread, the jobs run on this worker's own thread."""

    def __init__(self, pipelines: dict[str, Pipeline], max_queue: int = 32, max_batch: int = 8,
                 keep_finished: int = 64, batch_window_s: float = 0.03):
        if not pipelines:
            raise FlowflashError("the server needs at least one model")
        self.pipelines = pipelines
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.keep_finished = keep_finished  # finished jobs kept for polling; older ones are forgotten
        self.jobs: dict[str, Job] = {}
        self.queue: deque[Job] = deque()
        self.running: list[Job] = []
        self.lock = threading.Condition()
        self.served = 0  # images made since start
        self.batch_sizes: list[int] = []  # images per denoising call, last 1000
        self._stop = False
        self._last_jobs = 1  # jobs in the last call: how many to wait for in the next
        self._finished: deque[str] = deque()
        self._thread = threading.Thread(target=self._loop, name="flowflash-worker", daemon=True)
        self._seed_rng = secrets.SystemRandom()

    # ------------------------------------------------------------------ client side
    def start(self) -> "Worker":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0):
        with self.lock:
            self._stop = True
            for job in list(self.queue):
                self._finish(job, "cancelled")
            self.queue.clear()
            for job in self.running:
                job.cancel_requested = True
            self.lock.notify_all()
        self._thread.join(timeout)

    def random_seed(self) -> int:
        return self._seed_rng.randrange(2**31 - 1)

    def submit(self, spec: JobSpec) -> Job:
        with self.lock:
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} jobs are waiting (the limit is {self.max_queue}); retry shortly")
            job = Job(secrets.token_hex(8), spec)
            job.seeds = [spec.seed + k for k in range(spec.n)]
            self.jobs[job.id] = job
            self.queue.append(job)
            self._event(job, {"type": "queued", "position": len(self.queue)})
            self.lock.notify_all()
            return job

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once; a running one stops at its next step (or its result is dropped)."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job.finished:
                return job
            job.cancel_requested = True
            if job in self.queue:
                self.queue.remove(job)
                self._finish(job, "cancelled")
            self.lock.notify_all()
            return job

    def interrupt(self) -> int:
        """Cancel what runs now (A1111's /interrupt); returns how many jobs that touched."""
        with self.lock:
            for job in self.running:
                job.cancel_requested = True
            return len(self.running)

    def forget(self, job_id: str) -> None:
        """Drop a finished job whose result was delivered (blocking calls), so memory holds only what waits."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is not None and job.finished:
                del self.jobs[job_id]

    def position(self, job: Job) -> int:
        """1-based place in the queue; 0 once running or finished."""
        with self.lock:
            try:
                return self.queue.index(job) + 1
            except ValueError:
                return 0

    def status(self) -> dict:
        with self.lock:
            run = self.running[0] if self.running else None
            return {"queued": len(self.queue), "running": len(self.running), "served": self.served,
                    "step": run.step if run else 0, "steps": run.steps if run else 0,
                    "preview": run.preview_png if run else None,
                    "interrupted": bool(run and run.cancel_requested),
                    "started": run.params.get("started") if run else None,
                    "mean_batch": round(sum(self.batch_sizes) / len(self.batch_sizes), 2) if self.batch_sizes else 0}

    # ------------------------------------------------------------------ worker side
    def _event(self, job: Job, event: dict):
        job.events.append({"job": job.id, **event})
        for wake in list(job.listeners):
            wake()
        self.lock.notify_all()

    def listen(self, job: Job, wake) -> None:
        """Call `wake()` (from any thread, cheap, non-blocking) whenever the job has a new event."""
        with self.lock:
            job.listeners.append(wake)

    def unlisten(self, job: Job, wake) -> None:
        with self.lock:
            if wake in job.listeners:
                job.listeners.remove(wake)

    def _finish(self, job: Job, status: str, error: str | None = None):
        job.status, job.error = status, error
        ev = {"type": status}
        if error:
            ev["error"] = error
        if status == "done":
            ev.update(images=job.pngs, seeds=job.seeds, parameters=job.params)
        self._event(job, ev)
        self._finished.append(job.id)
        while len(self._finished) > self.keep_finished:  # bounded memory: forget the oldest results
            self.jobs.pop(self._finished.popleft(), None)

    def _take_batch(self) -> list[Job]:
        """The oldest job and the waiting jobs that can share its call, up to max_batch images.

        Clients answered by the last call send their next request a moment later; when that call served
        several jobs, wait up to batch_window_s for as many to gather, so that concurrent clients keep sharing
        calls. A lone client never waits."""
        first = self.queue.popleft()
        batch, total, key = [first], first.spec.n, first.spec.batch_key()
        want = min(self.max_batch, self._last_jobs)
        deadline = time.monotonic() + self.batch_window_s
        while key is not None:
            for job in list(self.queue):
                if job.spec.batch_key() == key and total + job.spec.n <= self.max_batch:
                    self.queue.remove(job)
                    batch.append(job)
                    total += job.spec.n
            left = deadline - time.monotonic()
            if len(batch) >= want or total >= self.max_batch or left <= 0 or self._stop:
                break
            self.lock.wait(left)
        self._last_jobs = len(batch)
        for pos, job in enumerate(self.queue, 1):  # everyone behind moves up
            if job.events and job.events[-1].get("position") != pos:
                self._event(job, {"type": "queued", "position": pos})
        return batch

    def _loop(self):
        while True:
            with self.lock:
                while not self.queue and not self._stop:
                    self.lock.wait()
                if self._stop:
                    return
                batch = self._take_batch()
                for job in batch:
                    job.status = "running"
                    self._event(job, {"type": "started"})
                self.running = batch
            try:
                self._run(batch)
            except Exception as e:  # a bad job never takes the worker down
                with self.lock:
                    for job in batch:
                        if not job.finished:
                            if isinstance(e, Cancelled) or job.cancel_requested:
                                self._finish(job, "cancelled")
                            else:
                                msg = str(e) if isinstance(e, FlowflashError) else f"{type(e).__name__}: {e}"
                                self._finish(job, "failed", msg)
            finally:
                with self.lock:
                    self.running = []
                    self.lock.notify_all()

    def _run(self, batch: list[Job]):
        spec = batch[0].spec
        pipe = self.pipelines[spec.model]
        prompts = [j.spec.prompt for j in batch for _ in range(j.spec.n)]
        seeds = [s for j in batch for s in j.seeds]
        spans, i = [], 0
        for j in batch:
            spans.append((i, i + j.spec.n))
            i += j.spec.n
        started = time.time()
        for j in batch:
            j.params["started"] = started

        def on_step(i: int, n_steps: int, images: list[Image.Image] | None):
            if all(j.cancel_requested for j in batch):
                raise Cancelled()
            # Encoded before taking the lock: handlers on the event loop take it too.
            shown = {id(j): png_b64(preview_strip(images[a:b])) for j, (a, b) in zip(batch, spans)
                     if images is not None and j.spec.previews and not j.cancel_requested}
            with self.lock:
                for j in batch:
                    j.step, j.steps = i + 1, n_steps
                    if j.cancel_requested:
                        continue
                    ev = {"type": "step", "step": i + 1, "steps": n_steps}
                    if id(j) in shown:
                        j.preview_png = ev["preview"] = shown[id(j)]
                    self._event(j, ev)

        # A decode per step only when some job shows previews; otherwise the step hook just counts and cancels.
        wants = any(j.spec.previews for j in batch)
        steps_of = len(pipe.timesteps(spec.steps, spec.size)) - 1
        if spec.init_image is not None:  # img2img integrates only the tail of the schedule (as Pipeline.run)
            steps_of -= int(max(steps_of - steps_of * spec.strength, 0))
        gen = pipe.run(prompts, seeds, spec.steps, spec.guidance, spec.size, negative_prompt=spec.negative_prompt,
                       init_image=spec.init_image, strength=spec.strength, complete_style=spec.complete_style,
                       preview=on_step if wants else None,
                       progress=None if wants else (lambda i: on_step(i, steps_of, None)))
        p = gen.params
        pngs = [png_b64(im) for im in gen.images]  # outside the lock: clients keep reading events meanwhile
        with self.lock:
            self.batch_sizes = (self.batch_sizes + [len(prompts)])[-1000:]
            for j, (a, b) in zip(batch, spans):
                if j.cancel_requested:
                    self._finish(j, "cancelled")
                    continue
                j.pngs = pngs[a:b]
                j.params = {"prompt": j.spec.prompt, "drawn_as": p.prompts[a], "as_typed": not spec.complete_style,
                            "negative_prompt": p.negative_prompt, "model": j.spec.model,
                            "steps": p.steps, "guidance": p.guidance, "seed": j.spec.seed, "seeds": j.seeds,
                            "width": p.size[0], "height": p.size[1], "strength": p.strength,
                            "batch_images": len(prompts), "seconds": round(time.time() - started, 4),
                            "warnings": gen.warnings}
                self.served += len(j.pngs)
                self._finish(j, "done")

