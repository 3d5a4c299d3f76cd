"""`flowflash serve` against real uvicorn servers on loopback ports, with a tiny model.

A subprocess server (the CLI, with an API key) takes the API round trips and bad inputs; an in-process uvicorn
whose model worker waits on a gate makes queueing, batching, cancelling and disconnects deterministic."""
from __future__ import annotations

import base64
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key-0123"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


RED_PNG = base64.b64encode(_png(Image.new("RGB", (16, 16), (200, 20, 20)))).decode()
# a PNG whose second IDAT chunk has a broken type: Pillow raises SyntaxError for it, not OSError
_noise = _png(Image.frombytes("RGB", (256, 256), random.Random(0).randbytes(256 * 256 * 3)))  # several IDATs
_second = _noise.index(b"IDAT", _noise.index(b"IDAT") + 4)
BROKEN_PNG = base64.b64encode(_noise[:_second] + b"I\x00AT" + _noise[_second + 4:]).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen | None = None, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server at {url} did not answer within {timeout} s")


def png(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def assert_same_draw(a: Image.Image, b: Image.Image) -> None:
    """The same seed drawn in a batch of one or of several: matmuls of different batch shapes round
    differently, so a pixel may move by one level (CI saw 0x85 vs 0x86). Other seeds move by far more."""
    da = np.asarray(a, dtype=np.int16)
    db = np.asarray(b, dtype=np.int16)
    assert da.shape == db.shape
    assert np.abs(da - db).max() <= 2, np.abs(da - db).max()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.conftest import tiny_model_config

    from flowflash.models.flow_model import FlowModel, save_model

    torch.manual_seed(0)
    return save_model(FlowModel(tiny_model_config()), tmp_path_factory.mktemp("serve") / "tiny-serve")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The CLI's server in its own process, with an API key."""
    port = free_port()
    out = tmp_path_factory.mktemp("serve-out")
    proc = subprocess.Popen([sys.executable, "-m", "flowflash.cli", "serve", "--model", str(model_dir), "--port",
                             str(port), "--api-key", KEY, "--output-dir", str(out), "--max-queue", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def api(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


# ---------------------------------------------------------------- OpenAI
def test_openai_client_unchanged(server, model_dir):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    assert model_dir.name in [m.id for m in client.models.list().data]
    r = client.images.generate(prompt="red apple", model=model_dir.name, n=2, size="16x16",
                               extra_body={"seed": 3, "steps": 2})
    assert len(r.data) == 2 and r.created > 0
    a, b = (png(d.b64_json) for d in r.data)
    assert a.size == (16, 16) and a.tobytes() != b.tobytes()  # seeds 3 and 4
    again = client.images.generate(prompt="red apple", n=1, extra_body={"seed": 3, "steps": 2})
    assert_same_draw(png(again.data[0].b64_json), a)  # same seed, same image; model defaults to ours
    assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() > 2  # the check can fail
    u = client.images.generate(prompt="dog face", response_format="url", extra_body={"seed": 1})
    got = httpx.get(u.data[0].url)  # fetched without the key, like OpenAI's urls
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    with pytest.raises(openai.BadRequestError, match="n must be between 1 and 8"):
        client.images.generate(prompt="dog", n=9)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong-key-000", max_retries=0).images.generate(prompt="dog")


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, "invalid_value"),
    (json.dumps({"prompt": "dog", "n": "two"}), 400, "n", "invalid_value"),
    (json.dumps({"prompt": 5}), 400, "prompt", "invalid_value"),
    (json.dumps({"n": 1}), 400, "prompt", "invalid_value"),
    (json.dumps({"prompt": "dog " * 600}), 400, "prompt", "prompt_too_long"),
    (json.dumps({"prompt": "   "}), 400, "prompt", "invalid_value"),
    (json.dumps({"prompt": "dog", "n": 1000}), 400, "n", "invalid_value"),
    (json.dumps({"prompt": "dog", "size": "99999x1"}), 400, "size", "invalid_size"),
    (json.dumps({"prompt": "dog", "size": "64x64"}), 400, "size", "invalid_size"),
    (json.dumps({"prompt": "dog", "size": "big"}), 400, "size", "invalid_size"),
    (json.dumps({"prompt": "dog", "steps": 0}), 400, "steps", "invalid_value"),
    (json.dumps({"prompt": "dog", "steps": 10**6}), 400, "steps", "invalid_value"),
    (json.dumps({"prompt": "dog", "guidance": -1}), 400, "guidance", "invalid_value"),
    (json.dumps({"prompt": "dog", "seed": -5}), 400, "seed", "invalid_value"),
    (json.dumps({"prompt": "dog", "response_format": "jpeg"}), 400, "response_format", "invalid_value"),
    (json.dumps({"prompt": "dog", "model": "dall-e-3"}), 404, "model", "model_not_found"),
])
def test_openai_bad_input(api, body, status, param, code):
    r = api.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["param"], err["code"]) == (param, code)
    assert api.get("/v1/models").status_code == 200  # still serving


def test_auth_required_and_checked(server):
    for headers in ({}, {"Authorization": "Bearer nope-nope-nope"}, {"Authorization": KEY}):
        r = httpx.post(f"{server}/v1/images/generations", json={"prompt": "dog"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server}/sdapi/v1/sd-models", headers=headers).status_code == 401
        assert httpx.post(f"{server}/api/jobs", json={"prompt": "dog"}, headers=headers).status_code == 401
    assert httpx.get(f"{server}/").status_code == 200  # the page itself is public; its calls carry the key


def test_oversize_body_and_unknown_output(api):
    r = api.post("/v1/images/generations", content=b"x" * (17 * 2**20), headers={"content-type": "application/json"})
    assert r.status_code == 413

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(17):
            yield b"x" * 2**20
    r = api.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    for name in ("../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "0123456789abcdef-0.png"):
        assert api.get(f"/outputs/{name}").status_code == 404


# ---------------------------------------------------------------- AUTOMATIC1111
def test_a1111_round_trip(api, model_dir):
    name = model_dir.name
    assert [m["title"] for m in api.get("/sdapi/v1/sd-models").json()] == [name]
    assert api.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == name
    assert api.post("/sdapi/v1/options", json={"sd_model_checkpoint": name}).status_code == 200
    assert api.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl"}).status_code == 404
    assert api.get("/sdapi/v1/samplers").json()[0]["name"] == "Euler"
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "red apple", "negative_prompt": "dog", "seed": -1, "steps": 3,
                                             "cfg_scale": 2.5, "width": 16, "height": 16, "batch_size": 2,
                                             "n_iter": 2, "sampler_name": "DPM++ 2M", "restore_faces": False})
    assert r.status_code == 200, r.text
    d = r.json()
    info = json.loads(d["info"])
    assert len(d["images"]) == 4 and png(d["images"][0]).size == (16, 16)
    s = info["seed"]
    assert s >= 0 and info["all_seeds"] == [s, s + 1, s + 2, s + 3] and len(info["infotexts"]) == 4
    assert info["steps"] == 3 and info["cfg_scale"] == 2.5 and "Seed: " in info["infotexts"][0]
    assert d["parameters"]["prompt"] == "red apple"
    fixed = api.post("/sdapi/v1/txt2img", json={"prompt": "red apple", "negative_prompt": "dog", "seed": s + 1,
                                                 "steps": 3, "cfg_scale": 2.5}).json()
    assert_same_draw(png(fixed["images"][0]), png(d["images"][1]))  # image k used seed + k
    with pytest.raises(AssertionError):
        assert_same_draw(png(fixed["images"][0]), png(d["images"][0]))
    i2i = api.post("/sdapi/v1/img2img", json={"prompt": "red apple", "init_images": [d["images"][0]],
                                              "denoising_strength": 0.5, "seed": 1, "steps": 4})
    assert i2i.status_code == 200, i2i.text
    assert json.loads(i2i.json()["info"])["steps"] == 4 and len(i2i.json()["images"]) == 1
    p = api.get("/sdapi/v1/progress").json()
    assert {"progress", "eta_relative", "state", "current_image"} <= set(p) and "sampling_step" in p["state"]
    assert api.post("/sdapi/v1/interrupt").status_code == 200


@pytest.mark.parametrize("path, body, status", [
    ("/sdapi/v1/txt2img", {"prompt": "dog", "width": 99999, "height": 1}, 400),
    ("/sdapi/v1/txt2img", {"prompt": "dog", "width": 32, "height": 32}, 400),
    ("/sdapi/v1/txt2img", {"prompt": "dog", "batch_size": 8, "n_iter": 2}, 400),
    ("/sdapi/v1/txt2img", {"prompt": "dog", "batch_size": 0}, 422),
    ("/sdapi/v1/txt2img", {"prompt": "dog", "steps": "many"}, 422),
    ("/sdapi/v1/txt2img", {"prompt": "dog", "override_settings": {"sd_model_checkpoint": "flux"}}, 404),
    ("/sdapi/v1/img2img", {"prompt": "dog"}, 422),
    ("/sdapi/v1/img2img", {"prompt": "dog", "init_images": ["!!notbase64!!"]}, 400),
    ("/sdapi/v1/img2img", {"prompt": "dog", "init_images": [base64.b64encode(b"text").decode()]}, 400),
    ("/sdapi/v1/img2img", {"prompt": "dog", "init_images": [""], "denoising_strength": 0}, 400),
    ("/api/jobs", {"prompt": "dog", "n": 1000}, 400),
    ("/sdapi/v1/txt2img", {"prompt": "dog", "override_settings": {"sd_model_checkpoint": ["a"]}}, 422),
    ("/sdapi/v1/img2img", {"prompt": "dog", "init_images": [BROKEN_PNG]}, 400),
    ("/sdapi/v1/img2img", {"prompt": "dog", "init_images": [RED_PNG], "denoising_strength": 1e-300}, 422),
    ("/api/jobs", {"prompt": "dog", "previews": "yes please"}, 422),
])
def test_a1111_and_jobs_bad_input(api, path, body, status):
    r = api.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["detail"]
    assert api.get("/health").status_code == 200


# ---------------------------------------------------------------- native jobs
def read_events(client: httpx.Client, job_id: str, limit: int = 200) -> list[tuple[str, dict]]:
    events = []
    with client.stream("GET", f"/api/jobs/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
            if len(events) >= limit:
                break
    return events


def test_job_events_stream_previews_then_images(api):
    r = api.post("/api/jobs", json={"prompt": "banana", "n": 2, "steps": 3, "seed": 7})
    assert r.status_code == 202 and r.json()["seeds"] == [7, 8]
    job = r.json()["id"]
    events = read_events(api, job)
    kinds = [k for k, _ in events]
    assert kinds[0] == "queued" and kinds[-1] == "done" and "started" in kinds
    steps = [e for k, e in events if k == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3] and all(e["steps"] == 3 for e in steps)
    strip = png(steps[-1]["preview"])
    assert strip.size == (2 * 16, 16)  # both images of the job side by side
    done = events[-1][1]
    assert len(done["images"]) == 2 and done["parameters"]["seeds"] == [7, 8]
    assert api.get(f"/api/jobs/{job}").json()["status"] == "done"
    assert api.get("/api/jobs/nope").status_code == 404


# ---------------------------------------------------------------- start-up checks
def test_refuses_network_address_without_key(capsys):
    from flowflash.cli import main

    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "refusing to listen on 0.0.0.0 without --api-key" in capsys.readouterr().err
    assert main(["serve", "--host", "192.168.1.5", "--api-key", "short"]) == 2
    assert "at least 8 characters" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--model", "/no/such/model"]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err  # before any model loads


# ---------------------------------------------------------------- in-process server with a gated worker
class GatedServer:
    """uvicorn in a thread over a Worker whose every denoising step waits for `gate`."""

    def __init__(self, model_dir, tmp_path, max_queue=2, max_batch=8):
        import uvicorn

        from flowflash.app.jobs import Worker
        from flowflash.app.server import Settings, create_app
        from flowflash.runtime.pipeline import Pipeline

        self.gate = threading.Event()
        self.calls: list[int] = []  # images per denoising call
        pipe = Pipeline.load(model_dir)
        real = pipe.run

        def run(prompts, seeds, *a, preview=None, progress=None, **kw):
            if any(p == "boom" for p in prompts):
                raise RuntimeError("the model fell over")
            self.calls.append(len(prompts))

            def hold(i, *rest):
                assert self.gate.wait(30), "gate never opened"
                (preview or progress)(i, *rest)
            return real(prompts, seeds, *a, preview=hold if preview else None,
                        progress=hold if progress else None, **kw)
        pipe.run = run
        self.worker = Worker({model_dir.name: pipe}, max_queue=max_queue, max_batch=max_batch).start()
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.worker, Settings(output_dir=tmp_path)),
                                                    host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        wait_up(self.url)
        return self

    def __exit__(self, *exc):
        self.gate.set()
        self.server.should_exit = True
        self.thread.join(10)
        self.worker.stop()

    def status(self, client, job_id, want, timeout=20.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s = client.get(f"/api/jobs/{job_id}").json()["status"]
            if s == want:
                return
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} is {s!r}, not {want!r}")


def test_models_list_the_step_counts_a_student_was_trained_for(model_dir, tmp_path):
    from tests.conftest import tiny_model_config

    from flowflash.models.flow_model import FlowModel, save_model

    student = save_model(FlowModel(tiny_model_config(sampling={"steps": 3, "schedule": [1.0, 0.6, 0.3, 0.0],
                                                               "other_schedules": [[1.0, 0.4, 0.0]]})),
                         tmp_path / "student")
    for folder, want, steps in ((student, [3, 2], 3), (model_dir, [], 4)):
        with GatedServer(folder, tmp_path) as g, httpx.Client(base_url=g.url, timeout=30) as c:
            m = c.get("/api/models").json()["models"][0]
            assert (m["trained_steps"], m["steps"]) == (want, steps)


def test_compatible_waiting_jobs_share_one_call(model_dir, tmp_path):
    with GatedServer(model_dir, tmp_path, max_queue=8) as g, httpx.Client(base_url=g.url, timeout=30) as c:
        first = c.post("/api/jobs", json={"prompt": "dog", "steps": 2}).json()["id"]
        g.status(c, first, "running")
        same = [c.post("/api/jobs", json={"prompt": p, "steps": 2, "n": 2}).json()["id"] for p in ("apple", "face")]
        other = c.post("/api/jobs", json={"prompt": "apple", "steps": 3}).json()["id"]
        assert c.get(f"/api/jobs/{other}").json()["position"] == 3
        g.gate.set()
        for j in [first, *same, other]:
            g.status(c, j, "done")
        assert g.calls == [1, 4, 1]  # the two 2-image jobs with equal settings ran together
        params = [c.get(f"/api/jobs/{j}").json()["parameters"] for j in same]
        assert [p["batch_images"] for p in params] == [4, 4] and [len(p["seeds"]) for p in params] == [2, 2]


def test_queue_overflow_cancel_disconnect_interrupt(model_dir, tmp_path, monkeypatch):
    real_connect = socket.socket.connect

    def loopback_only(self, address):  # the server opens no outbound connection
        assert isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1", "localhost"), address
        return real_connect(self, address)
    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    with GatedServer(model_dir, tmp_path, max_queue=2) as g, httpx.Client(base_url=g.url, timeout=30) as c:
        running = c.post("/api/jobs", json={"prompt": "dog", "steps": 2}).json()["id"]
        g.status(c, running, "running")
        queued = [c.post("/api/jobs", json={"prompt": "dog", "steps": 3}).json()["id"] for _ in range(2)]
        over = c.post("/v1/images/generations", json={"prompt": "dog"})
        assert over.status_code == 429 and over.headers["retry-after"] == "2"
        assert over.json()["error"]["code"] == "queue_full"
        assert c.post("/api/jobs", json={"prompt": "dog"}).status_code == 429
        # a queued job cancels at once, a running one at its next step
        assert c.delete(f"/api/jobs/{queued[0]}").json()["status"] == "cancelled"
        assert c.delete(f"/api/jobs/{running}").json()["status"] == "cancelling"
        g.gate.set()
        g.status(c, running, "cancelled")
        g.status(c, queued[1], "done")
        # a client that disconnects from its event stream cancels its job
        g.gate.clear()
        job = c.post("/api/jobs", json={"prompt": "apple", "steps": 2}).json()["id"]
        with c.stream("GET", f"/api/jobs/{job}/events") as r:
            next(r.iter_lines())
        time.sleep(0.1)
        g.gate.set()
        g.status(c, job, "cancelled")
        # A1111's interrupt stops what runs; its waiting txt2img call answers 409
        g.gate.clear()
        res = {}
        t = threading.Thread(target=lambda: res.update(r=c.post("/sdapi/v1/txt2img", json={"prompt": "dog"})))
        t.start()
        end = time.monotonic() + 10
        while c.get("/api/status").json()["running"] == 0 and time.monotonic() < end:
            time.sleep(0.02)
        assert c.post("/sdapi/v1/interrupt").status_code == 200
        g.gate.set()
        t.join(20)
        assert res["r"].status_code == 409
        # a job that raises fails alone; the worker goes on
        boom = c.post("/api/jobs", json={"prompt": "boom"}).json()["id"]
        g.status(c, boom, "failed")
        assert "the model fell over" in c.get(f"/api/jobs/{boom}").json()["error"]
        ok = c.post("/v1/images/generations", json={"prompt": "red apple", "seed": 2})
        assert ok.status_code == 200 and len(ok.json()["data"]) == 1


def test_keyless_server_answers_loopback_only_and_caps_n_at_max_batch(model_dir, tmp_path):
    with GatedServer(model_dir, tmp_path, max_batch=2) as g, httpx.Client(base_url=g.url, timeout=30) as c:
        g.gate.set()
        for headers in ({"Host": f"evil.example:{g.port}"}, {"Origin": "https://evil.example"}, {"Origin": "null"}):
            r = c.post("/api/jobs", json={"prompt": "dog"}, headers=headers)
            assert r.status_code == 403 and r.json()["error"] == "forbidden_host", headers
        ok = {"Host": f"localhost:{g.port}", "Origin": f"http://127.0.0.1:{g.port}"}
        assert c.post("/api/jobs", json={"prompt": "dog", "n": 2}, headers=ok).status_code == 202
        r = c.post("/v1/images/generations", json={"prompt": "dog", "n": 3})
        assert r.status_code == 400 and "between 1 and 2" in r.json()["error"]["message"]


def test_client_that_leaves_a_blocking_call_cancels_its_job(model_dir, tmp_path):
    with GatedServer(model_dir, tmp_path) as g, httpx.Client(base_url=g.url, timeout=30) as c:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{g.url}/v1/images/generations", json={"prompt": "dog", "steps": 2}, timeout=0.5)
        end = time.monotonic() + 10
        while time.monotonic() < end and not any(j.cancel_requested for j in g.worker.jobs.values()):
            time.sleep(0.05)
        g.gate.set()
        (job,) = g.worker.jobs.values()
        g.status(c, job.id, "cancelled")


def test_url_images_of_earlier_runs_count_against_the_kept_number(model_dir, tmp_path):
    from flowflash.app.jobs import Worker
    from flowflash.app.server import Settings, create_app
    from flowflash.runtime.pipeline import Pipeline

    out = tmp_path / "out"
    out.mkdir()
    old = [out / f"{k:016x}-0.png" for k in range(3)]
    for i, p in enumerate(old):
        p.write_bytes(b"png")
        os.utime(p, (1000 + i, 1000 + i))
    (out / "mine.txt").write_text("not the server's")
    worker = Worker({model_dir.name: Pipeline.load(model_dir)}).start()
    try:
        import uvicorn
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(worker, Settings(output_dir=out, keep_outputs=3)),
                                               host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_up(f"http://127.0.0.1:{port}")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/images/generations",
                       json={"prompt": "dog", "n": 2, "response_format": "url"}, timeout=60)
        assert r.status_code == 200
        assert not old[0].exists() and not old[1].exists() and old[2].exists()  # the two oldest went
        assert (out / "mine.txt").exists() and len(list(out.glob("*.png"))) == 3
        server.should_exit = True
        thread.join(10)
    finally:
        worker.stop()
