"""The HTTP layer: OpenAI images API, the AUTOMATIC1111 subset Open WebUI calls, a native job API with
server-sent events, and the page. Every handler validates, hands a JobSpec to the Worker and waits on it;
nothing here touches a model except its cheap size check."""
from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import ipaddress
import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from ..errors import FlowflashError
from ..runtime.pipeline import ALIASES
from .jobs import TERMINAL, Job, JobSpec, QueueFull, Worker

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 16 * 2**20  # bytes; an init image fits, a flood does not
OUTPUT_NAME = re.compile(r"^[0-9a-f]{16}-\d{1,2}\.png$")


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 2000
    max_images: int = 8  # per request
    max_steps: int = 100
    max_side: int = 2048
    max_guidance: float = 30.0
    max_init_pixels: int = 4096 * 4096


@dataclass
class Settings:
    api_key: str | None = None
    limits: Limits = Limits()
    output_dir: Path | None = None  # where response_format=url images go
    keep_outputs: int = 500  # url images kept on disk; older ones are deleted
    wait_timeout_s: float = 600.0


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class ApiError(Exception):
    """An error answered as JSON in the calling API's own shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- request bodies
class _Body(BaseModel):
    # Clients send fields we do not use (quality, style, user, A1111's many knobs): accepted and ignored.
    model_config = ConfigDict(extra="ignore")


class OpenAIImageRequest(_Body):
    prompt: StrictStr
    model: StrictStr | None = None
    n: StrictInt = 1
    size: StrictStr | None = None
    response_format: StrictStr | None = "b64_json"
    seed: StrictInt | None = None
    steps: StrictInt | None = None
    guidance: StrictFloat | StrictInt | None = None
    negative_prompt: StrictStr | None = None
    as_typed: StrictBool = False  # no style completion (a flowflash extension, as seed and steps)


class A1111Request(_Body):
    prompt: StrictStr = ""
    negative_prompt: StrictStr = ""
    seed: StrictInt = -1
    steps: StrictInt | None = None
    cfg_scale: StrictFloat | StrictInt | None = None
    width: StrictInt | None = None
    height: StrictInt | None = None
    batch_size: StrictInt = 1
    n_iter: StrictInt = 1
    sampler_name: StrictStr | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    # img2img
    init_images: list[StrictStr] | None = None
    denoising_strength: StrictFloat | StrictInt = 0.75


class JobRequest(_Body):
    prompt: StrictStr
    model: StrictStr | None = None
    n: StrictInt = 1
    steps: StrictInt | None = None
    guidance: StrictFloat | StrictInt | None = None
    seed: StrictInt | None = None
    width: StrictInt | None = None
    height: StrictInt | None = None
    negative_prompt: StrictStr | None = None
    init_image: StrictStr | None = None
    strength: StrictFloat | StrictInt = 0.8
    previews: StrictBool = True
    as_typed: StrictBool = False


# ---------------------------------------------------------------- the app
def create_app(worker: Worker, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    lim = settings.limits
    app = FastAPI(title="flowflash", docs_url=None, redoc_url=None, openapi_url=None)
    state = {"default": next(iter(worker.pipelines))}
    # images written by earlier runs count against keep_outputs too, oldest first
    written: list[Path] = sorted((p for p in settings.output_dir.iterdir() if OUTPUT_NAME.match(p.name)),
                                 key=lambda p: p.stat().st_mtime) if settings.output_dir and \
        settings.output_dir.is_dir() else []

    # ------------------------------------------------------------ errors, auth, body size
    def error_body(request: Request, e: ApiError) -> dict:
        if request.scope["path"].startswith("/v1/"):  # the routed path, not one rebuilt from the Host header
            return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
        return {"error": e.code or e.kind, "detail": e.message, "param": e.param}

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(request, e), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        else:
            param = ".".join(loc) or None
            msg = f"{param or 'body'}: {first.get('msg', 'invalid')}"
        status = 400 if request.scope["path"].startswith("/v1/") else 422
        return JSONResponse(error_body(request, ApiError(status, msg, param, "invalid_value")), status_code=status)

    class Guard:
        """Body size and API key, as plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide a client's
        disconnect from the handlers that watch for it."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            return await guard(scope, receive, send, self.app)

    async def guard(scope, receive, send, inner):
        request = Request(scope)
        path = scope["path"]  # what the router routes: the URL is partly built from the Host header
        too_big = ApiError(413, f"request body over {MAX_BODY // 2**20} MB", code="body_too_large")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return await JSONResponse(error_body(request, too_big), status_code=413)(scope, receive, send)
        if not settings.api_key:
            # Without a key only loopback may call: a web page's requests (another Origin) and DNS rebinding
            # (another Host) are refused, so no site the user visits can drive the server.
            host = urlsplit("//" + request.headers.get("host", "")).hostname
            origin = request.headers.get("origin")
            if host not in LOOPBACK_HOSTS or (origin is not None and urlsplit(origin).hostname not in LOOPBACK_HOSTS):
                e = ApiError(403, "this server answers its own machine only (Host and Origin must be loopback); "
                                  "start it with --api-key to serve others", code="forbidden_host",
                             kind="permission_error")
                return await JSONResponse(error_body(request, e), status_code=403)(scope, receive, send)
        # Written images are public like OpenAI's urls: their names are random 64-bit ids, and clients fetch
        # them without the key.
        public = (path == "/" or path.startswith(("/static/", "/outputs/")) or path == "/health"
                  or path == "/favicon.ico")
        if settings.api_key and not public:
            got = request.headers.get("authorization", "")
            token = got[7:] if got.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), settings.api_key.encode()):
                e = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key", kind="authentication_error")
                return await JSONResponse(error_body(request, e), status_code=401,
                                          headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # A body without Content-Length (chunked) is read here, at most MAX_BODY bytes, then replayed.
            parts, seen, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                parts.append(message.get("body", b""))
                seen += len(parts[-1])
                more = message.get("more_body", False)
                if seen > MAX_BODY:
                    return await JSONResponse(error_body(request, too_big), status_code=413)(scope, receive, send)
            body, replayed = b"".join(parts), False

            async def replay():
                nonlocal replayed
                if replayed:
                    return await receive()  # after the body: disconnects reach the handlers as before
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await inner(scope, replay, send)
        return await inner(scope, receive, send)

    # ------------------------------------------------------------ shared validation
    def model_name(name: str | None, param: str = "model") -> str:
        if name is None or name == "":
            return state["default"]
        name = ALIASES.get(name, name)
        if name not in worker.pipelines:
            raise ApiError(404, f"unknown model {name!r}; this server has: {', '.join(worker.pipelines)}",
                           param, "model_not_found")
        return name

    def check_common(prompt: str, n: int, steps: int | None, guidance: float | None,
                     negative: str | None, seed: int | None) -> None:
        if not prompt.strip():
            raise ApiError(400, "prompt is empty", "prompt", "invalid_value")
        if len(prompt) > lim.max_prompt_chars:
            raise ApiError(400, f"prompt is {len(prompt)} characters; the limit is {lim.max_prompt_chars}",
                           "prompt", "prompt_too_long")
        if negative is not None and len(negative) > lim.max_prompt_chars:
            raise ApiError(400, f"negative prompt over {lim.max_prompt_chars} characters", "negative_prompt",
                           "prompt_too_long")
        most = min(lim.max_images, worker.max_batch)  # one request is one denoising call at most --max-batch
        if not 1 <= n <= most:
            raise ApiError(400, f"n must be between 1 and {most}, got {n}", "n", "invalid_value")
        if steps is not None and not 1 <= steps <= lim.max_steps:
            raise ApiError(400, f"steps must be between 1 and {lim.max_steps}, got {steps}", "steps",
                           "invalid_value")
        if guidance is not None and not 0 <= guidance <= lim.max_guidance:
            raise ApiError(400, f"guidance must be between 0 and {lim.max_guidance}, got {guidance}", "guidance",
                           "invalid_value")
        if seed is not None and not 0 <= seed < 2**32:
            raise ApiError(400, f"seed must be between 0 and {2**32 - 1}, got {seed}", "seed", "invalid_value")

    def check_size(model: str, w: int | None, h: int | None, param: str = "size") -> tuple[int, int] | None:
        if w is None and h is None:
            return None
        pipe = worker.pipelines[model]
        if w is None or h is None:  # A1111 clients may send one side: the other is the model's default
            dw, dh = pipe.model.check_size(None)
            w, h = w or dw, h or dh
        if not (0 < w <= lim.max_side and 0 < h <= lim.max_side):
            raise ApiError(400, f"size {w}x{h} is outside 1..{lim.max_side} per side", param, "invalid_size")
        try:
            return pipe.model.check_size((w, h))
        except FlowflashError as e:
            raise ApiError(400, str(e), param, "invalid_size") from None

    def parse_size(size: str | None, model: str) -> tuple[int, int] | None:
        if size is None or size == "auto":
            return None
        m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
        if not m:
            raise ApiError(400, f"size must look like 1024x1024, got {size!r}", "size", "invalid_size")
        return check_size(model, int(m[1]), int(m[2]))

    def check_strength(model: str, steps: int | None, size, strength: float, param: str) -> None:
        """img2img starts `strength` into the schedule (as Pipeline.run): it must leave at least one step."""
        if not 0 < strength <= 1:
            raise ApiError(422, f"{param} must lie in (0, 1], got {strength}", param, "invalid_value")
        n = len(worker.pipelines[model].timesteps(steps, size)) - 1
        if n - int(max(n - min(n * strength, n), 0)) < 1:
            raise ApiError(422, f"{param} {strength} leaves none of the {n} steps: raise it or the steps", param,
                           "invalid_value")

    def decode_image(data: str, param: str) -> Image.Image:
        if data.startswith("data:"):
            data = data.split(",", 1)[-1]
        try:
            raw = base64.b64decode(data, validate=True)
            im = Image.open(io.BytesIO(raw))
            if im.width * im.height > lim.max_init_pixels:
                raise ApiError(400, f"init image {im.width}x{im.height} is too large", param, "invalid_image")
            return im.convert("RGB")
        except ApiError:
            raise
        except (binascii.Error, ValueError, OSError, SyntaxError, Image.DecompressionBombError):  # Pillow: all
            raise ApiError(400, "init image is not a base64-encoded PNG/JPEG/WebP", param, "invalid_image") from None

    def submit(spec: JobSpec) -> Job:
        if spec.steps == worker.pipelines[spec.model].sampling.steps:  # the default, said aloud: batch it as such
            spec = dataclasses.replace(spec, steps=None)
        try:
            return worker.submit(spec)
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full", kind="rate_limit_error",
                           headers={"Retry-After": "2"}) from None

    def waker(job: Job) -> tuple[asyncio.Event, Any]:
        """An asyncio event set (thread-safely) on each new event of the job."""
        loop, ev = asyncio.get_running_loop(), asyncio.Event()
        wake = lambda: loop.call_soon_threadsafe(ev.set)
        worker.listen(job, wake)
        return ev, wake

    async def wait_done(request: Request, job: Job) -> Job:
        """Wait for a job without holding a thread; a client that goes away cancels its job."""
        end = time.monotonic() + settings.wait_timeout_s
        ev, wake = waker(job)
        checked = time.monotonic()
        try:
            while not job.finished:
                try:
                    await asyncio.wait_for(ev.wait(), 0.25)
                except asyncio.TimeoutError:
                    pass
                ev.clear()
                now = time.monotonic()
                if now - checked >= 0.25 and not job.finished:  # step events must not hide a disconnect
                    checked = now
                    if await request.is_disconnected():
                        worker.cancel(job.id)
                        raise ApiError(499, "client closed the request", code="cancelled")
                    if now > end:
                        worker.cancel(job.id)
                        raise ApiError(504, "generation took too long", code="timeout", kind="server_error")
        finally:
            worker.unlisten(job, wake)
        if job.status == "failed":
            raise ApiError(500, f"generation failed: {job.error}", code="generation_failed", kind="server_error")
        if job.status == "cancelled":
            raise ApiError(409, "the job was cancelled", code="cancelled")
        return job

    def save_output(job: Job, k: int, png: str) -> str:
        if settings.output_dir is None:
            raise ApiError(400, "this server keeps no image files: use response_format b64_json",
                           "response_format", "invalid_value")
        name = f"{job.id}-{k}.png"
        path = settings.output_dir / name
        path.write_bytes(base64.b64decode(png))
        written.append(path)
        while len(written) > settings.keep_outputs:  # bounded disk use
            written.pop(0).unlink(missing_ok=True)
        return name

    # ------------------------------------------------------------ OpenAI images
    @app.post("/v1/images/generations")
    async def openai_generate(body: OpenAIImageRequest, request: Request):
        model = model_name(body.model)
        check_common(body.prompt, body.n, body.steps, body.guidance, body.negative_prompt, body.seed)
        if body.response_format not in (None, "b64_json", "url"):
            raise ApiError(400, f"response_format must be b64_json or url, got {body.response_format!r}",
                           "response_format", "invalid_value")
        size = parse_size(body.size, model)
        seed = worker.random_seed() if body.seed is None else body.seed
        job = submit(JobSpec(body.prompt, model, body.n, body.steps, body.guidance, seed, size,
                             body.negative_prompt or None, previews=False, complete_style=not body.as_typed))
        await wait_done(request, job)
        if body.response_format == "url":
            base = str(request.base_url).rstrip("/")
            data = [{"url": f"{base}/outputs/{save_output(job, k, im)}",
                     "revised_prompt": job.params["drawn_as"]}
                    for k, im in enumerate(job.pngs)]
        else:
            data = [{"b64_json": im, "revised_prompt": job.params["drawn_as"]} for im in job.pngs]
        worker.forget(job.id)
        return {"created": int(job.created), "data": data}

    def model_entry(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "flowflash"}

    @app.get("/v1/models")
    async def openai_models():
        return {"object": "list", "data": [model_entry(n) for n in worker.pipelines]}

    @app.get("/v1/models/{name}")
    async def openai_model(name: str):
        return model_entry(model_name(name))

    @app.get("/outputs/{name}")
    async def output_file(name: str):
        # Only names this server writes, inside its folder: no path can reach anything else.
        if settings.output_dir is None or not OUTPUT_NAME.match(name) or not (settings.output_dir / name).is_file():
            raise ApiError(404, "no such image", code="not_found")
        return FileResponse(settings.output_dir / name, media_type="image/png")

    # ------------------------------------------------------------ AUTOMATIC1111
    async def a1111(body: A1111Request, request: Request, img2img: bool):
        wanted = body.override_settings.get("sd_model_checkpoint")
        if wanted is not None and not isinstance(wanted, str):
            raise ApiError(422, "override_settings.sd_model_checkpoint must be a string", "override_settings",
                           "invalid_value")
        model = model_name(wanted or None, "override_settings")
        n = body.batch_size * body.n_iter
        if body.batch_size < 1 or body.n_iter < 1:
            raise ApiError(422, "batch_size and n_iter must be at least 1", "batch_size", "invalid_value")
        seed = worker.random_seed() if body.seed == -1 else body.seed
        check_common(body.prompt, n, body.steps, body.cfg_scale, body.negative_prompt, seed)
        size = check_size(model, body.width, body.height, "width")
        init, strength = None, 0.8
        if img2img:
            if not body.init_images:
                raise ApiError(422, "img2img needs init_images (one base64 image)", "init_images", "invalid_value")
            init = decode_image(body.init_images[0], "init_images")
            strength = float(body.denoising_strength)
            check_strength(model, body.steps, size, strength, "denoising_strength")
        job = submit(JobSpec(body.prompt, model, n, body.steps, body.cfg_scale, seed, size,
                             body.negative_prompt or None, init, strength, previews=True))
        await wait_done(request, job)
        p = job.params
        infotexts = [f"{p.get('drawn_as', body.prompt)}\nNegative prompt: {body.negative_prompt}\n"
                     f"Steps: {p['steps']}, Sampler: Euler, CFG scale: {p['guidance']}, Seed: {s}, "
                     f"Size: {p['width']}x{p['height']}, Model: {model}"
                     for s in job.seeds]
        info = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "seed": job.seeds[0],
                "all_seeds": job.seeds, "all_prompts": [body.prompt] * n, "steps": p["steps"],
                "cfg_scale": p["guidance"], "width": p["width"], "height": p["height"], "sampler_name": "Euler",
                "sd_model_name": model, "infotexts": infotexts}
        params = body.model_dump(exclude={"init_images"})
        worker.forget(job.id)
        return {"images": job.pngs, "parameters": params, "info": json.dumps(info)}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: A1111Request, request: Request):
        return await a1111(body, request, img2img=False)

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: A1111Request, request: Request):
        return await a1111(body, request, img2img=True)

    @app.get("/sdapi/v1/progress")
    async def progress():
        s = worker.status()
        frac = s["step"] / s["steps"] if s["steps"] else 0.0
        eta = 0.0
        if s["started"] and frac > 0:
            spent = time.time() - s["started"]
            eta = spent / frac - spent
        return {"progress": frac, "eta_relative": eta,
                "state": {"skipped": False, "interrupted": s["interrupted"], "job": "", "job_count":
                          s["queued"] + s["running"], "job_timestamp": "", "job_no": 0,
                          "sampling_step": s["step"], "sampling_steps": s["steps"]},
                "current_image": s["preview"], "textinfo": None}

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        worker.interrupt()
        return {}

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [{"title": n, "model_name": n, "hash": None, "sha256": None,
                 "filename": str(p.path) if p.path else n, "config": None} for n, p in worker.pipelines.items()]

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": "Euler", "aliases": ["euler", "flow_euler"], "options": {}}]

    @app.get("/sdapi/v1/options")
    async def get_options():
        return {"sd_model_checkpoint": state["default"]}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(422, "the request body is not valid JSON", code="invalid_value") from None
        if not isinstance(body, dict):
            raise ApiError(422, "options must be a JSON object", code="invalid_value")
        if "sd_model_checkpoint" in body:
            if not isinstance(body["sd_model_checkpoint"], str):
                raise ApiError(422, "sd_model_checkpoint must be a string", "sd_model_checkpoint", "invalid_value")
            state["default"] = model_name(body["sd_model_checkpoint"], "sd_model_checkpoint")
        return None

    # ------------------------------------------------------------ native jobs
    def job_view(job: Job) -> dict:
        v = {"id": job.id, "status": job.status, "position": worker.position(job), "step": job.step,
             "steps": job.steps, "seeds": job.seeds, "error": job.error}
        if job.status == "done":
            v.update(images=job.pngs, parameters=job.params)
        return v

    def get_job(job_id: str) -> Job:
        job = worker.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r}", "id", "not_found")
        return job

    @app.post("/api/jobs", status_code=202)
    async def create_job(body: JobRequest):
        model = model_name(body.model)
        check_common(body.prompt, body.n, body.steps, body.guidance, body.negative_prompt, body.seed)
        size = check_size(model, body.width, body.height, "width")
        init = decode_image(body.init_image, "init_image") if body.init_image else None
        if init is not None:
            check_strength(model, body.steps, size, float(body.strength), "strength")
        seed = worker.random_seed() if body.seed is None else body.seed
        job = submit(JobSpec(body.prompt, model, body.n, body.steps, body.guidance, seed, size,
                             body.negative_prompt or None, init, float(body.strength), body.previews,
                             complete_style=not body.as_typed))
        return {"id": job.id, "position": worker.position(job), "seeds": job.seeds}

    @app.get("/api/jobs/{job_id}")
    async def read_job(job_id: str):
        return job_view(get_job(job_id))

    @app.delete("/api/jobs/{job_id}")
    async def delete_job(job_id: str):
        job = worker.cancel(get_job(job_id).id)
        return {"id": job.id, "status": job.status if job.finished else "cancelling"}

    @app.get("/api/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        job = get_job(job_id)

        async def stream():
            seen = 0
            ev, wake = waker(job)
            try:
                while True:
                    ev.clear()
                    new = job.events[seen:]
                    seen += len(new)
                    for e in new:
                        yield f"event: {e['type']}\ndata: {json.dumps(e)}\n\n"
                    # The last event sent, not job.status, ends the stream: the worker sets the status an
                    # instant before it appends the final event.
                    if new and new[-1]["type"] in TERMINAL:
                        return
                    try:
                        await asyncio.wait_for(ev.wait(), 15)
                    except asyncio.TimeoutError:  # a comment now and then keeps proxies from closing the stream
                        yield ": keep-alive\n\n"
            finally:
                worker.unlisten(job, wake)
                if not job.finished:  # the client went away: its job is no longer wanted
                    worker.cancel(job.id)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/models")
    async def models():
        out = []
        for name, pipe in worker.pipelines.items():
            s = pipe.sampling
            w, h = pipe.model.check_size(None)
            out.append({"name": name, "default": name == state["default"], "steps": s.steps,
                        "trained_steps": list(s.trained_steps), "guidance": s.guidance, "width": w, "height": h,
                        "default_style": s.default_style})
        return {"models": out, "limits": {"max_images": lim.max_images, "max_steps": lim.max_steps,
                                          "max_prompt_chars": lim.max_prompt_chars}}

    @app.get("/api/status")
    async def status():
        s = worker.status()
        s.pop("preview")
        return s

    @app.get("/health")
    async def health():
        return {"ok": True}

    # ------------------------------------------------------------ the page
    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    async def static(name: str):
        files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
        if name not in files:
            raise ApiError(404, "no such file", code="not_found")
        return FileResponse(files[name])

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    app.add_middleware(Guard)
    return app
