"""The page of `flowflash serve`, driven in headless Chromium against a real server in a subprocess.

The server runs a small random-weight model built here (64x64 images, cheap steps), unless
FLOWFLASH_BROWSER_MODEL names another (e.g. `student`, the shipped model, to refresh docs/serve.png with
FLOWFLASH_SCREENSHOT=docs/serve.png). Needs Debian's chromium and chromium-driver; skipped without them.
"""
from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless browser test needs Debian's chromium: apt-get install -y chromium chromium-driver")

API_KEY = "browser-test-key-0123"
START_TIMEOUT = 60  # s for the server to load its model and answer /health
JOB_TIMEOUT = 60  # s for a small job to finish, on a slow shared machine
TERMINAL = ("done", "failed", "cancelled")

CARDS_JS = """
return [...document.querySelectorAll('#gallery .job')].map(c => ({
  id: c.dataset.id, state: c.dataset.state, previews: Number(c.dataset.previews),
  status: c.querySelector('.status').textContent,
  preview: (() => { const p = c.querySelector('img.preview');
                    return p ? {shown: !p.hidden, w: p.naturalWidth, h: p.naturalHeight} : null; })(),
  results: [...c.querySelectorAll('img.result')].map(i => ({
    loaded: i.complete && i.naturalWidth > 0, w: i.naturalWidth, h: i.naturalHeight,
    shown: Math.round(i.getBoundingClientRect().width), rendering: getComputedStyle(i).imageRendering,
    src: i.getAttribute('src')})),
  links: [...c.querySelectorAll('a.download')].map(a => ({href: a.getAttribute('href'),
                                                          download: a.getAttribute('download')})),
  params: Object.fromEntries([...c.querySelectorAll('.params dt')].map(dt => [dt.textContent,
                                                                           dt.nextElementSibling.textContent])),
  text: c.innerText,
}));
"""


# ---------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _start_server(model: str, env: dict, folder: Path, api_key: str | None = None):
    """`flowflash serve` on a free loopback port; returns (process, base URL, log path) once /health answers."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "server.log"
    for _ in range(3):  # a free port can be taken between the probe and uvicorn's bind: then try another
        port = _free_port()
        cmd = [sys.executable, "-m", "flowflash.cli", "serve", "--model", model, "--port", str(port),
               "--output-dir", str(folder / "out")]
        if api_key:
            cmd += ["--api-key", api_key]
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        base = f"http://127.0.0.1:{port}"
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end and proc.poll() is None:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    return proc, base, log
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        _stop(proc)
        if "address already in use" not in _tail(log).lower():
            break
    pytest.fail(f"`flowflash serve` did not answer /health within {START_TIMEOUT} s:\n{_tail(log)}")


@pytest.fixture(scope="module")
def served_model(tmp_path_factory, tiny_minilm):
    """(model argument, environment, whether it is the tiny test model) for the server subprocess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    name = os.environ.get("FLOWFLASH_BROWSER_MODEL")
    if name:  # a real model: it needs the real MiniLM, not the tests' tiny stand-in
        env.pop("FLOWFLASH_MINILM_DIR", None)
        return name, env, False
    from flowflash.models.flow_model import FlowModel, save_model
    from tests.conftest import tiny_model_config

    # conftest's tiny model, at 64x64 with 2-px patches: a 12-step job takes a fraction of a second, a
    # 100-step batch of 8 with guidance several seconds, long enough to cancel it while it runs.
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("browser-model") / "tiny-model"
    # trained times for 4 and 2 steps, as a distilled student's: the page offers those counts
    sampling = {"schedule": [1.0, 0.75, 0.5, 0.25, 0.0], "other_schedules": [[1.0, 0.5, 0.0]],
                # a default style, as the shipped teacher's: the page says how a plain prompt was drawn
                "styles": ["twemoji style", "fluent flat style"], "default_style": "twemoji style"}
    save_model(FlowModel(tiny_model_config(image_size=64, patch_size=2, num_layers=2, head_dim=16,
                                           sampling=sampling)), folder)
    env["FLOWFLASH_MINILM_DIR"] = str(tiny_minilm)
    return str(folder), env, True


@pytest.fixture(scope="module")
def server(served_model, tmp_path_factory):
    model, env, _ = served_model
    proc, base, log = _start_server(model, env, tmp_path_factory.mktemp("serve"))
    yield base
    _stop(proc)


@pytest.fixture(scope="module")
def keyed_server(served_model, tmp_path_factory):
    model, env, _ = served_model
    proc, base, log = _start_server(model, env, tmp_path_factory.mktemp("serve-key"), api_key=API_KEY)
    yield base
    _stop(proc)


# ---------------------------------------------------------------- the browser
@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--disable-component-update",
                # nothing but loopback resolves: a stray CDN reference fails at once instead of hanging
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for script_errors
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, predicate, timeout: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate(d), f"timed out: {what}")


def cards(driver) -> list[dict]:
    return driver.execute_script(CARDS_JS)


def open_page(driver, base: str) -> None:
    driver.get(base + "/")
    loaded = "return document.querySelectorAll('#model option').length > 0 && document.getElementById('steps').value"
    wait_for(driver, lambda d: d.execute_script(loaded), 20, "the page loads its models")


def fill(driver, field: str, value) -> None:
    el = driver.find_element("id", field)
    el.clear()
    if value != "":
        el.send_keys(str(value))


def wait_card(driver, job_id: str, done, timeout: float, what: str) -> dict:
    def check(d):
        c = next((c for c in cards(d) if c["id"] == job_id), None)
        return c if c is not None and done(c) else False
    return wait_for(driver, check, timeout, what)


def new_card(driver, count_before: int) -> dict:
    """The card of the job just submitted: the gallery shows the newest first."""
    wait_for(driver, lambda d: len(cards(d)) > count_before, 20, "a new job card")
    return cards(driver)[0]


def job_status(base: str, job_id: str, headers: dict | None = None) -> str:
    return httpx.get(f"{base}/api/jobs/{job_id}", headers=headers, timeout=5).json()["status"]


def off_origin_requests(driver, base: str) -> list[str]:
    names = driver.execute_script(
        "return [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')]"
        ".map(e => e.name)")
    return [n for n in names if not (n.startswith(base + "/") or n == base or n.startswith("data:"))]


def script_errors(driver) -> list[str]:
    """Errors on the page's console, less the network log of 4xx answers the page handles itself."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]


def save_screenshot(driver, path: Path) -> None:
    from PIL import Image

    for _ in range(3):  # the whole page, no scroll bar: grow the window by what the viewport lacks
        inner, content, outer = driver.execute_script(
            "return [window.innerHeight, document.documentElement.scrollHeight, window.outerHeight]")
        if inner >= content:
            break
        driver.set_window_size(1280, min(outer + content - inner, 2400))
    driver.execute_script("window.scrollTo(0, 0)")
    raw = driver.get_screenshot_as_png()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(io.BytesIO(raw)).save(path, optimize=True)


# ---------------------------------------------------------------- the tests
def test_generate_shows_previews_results_and_downloads(browser, server, served_model, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    d = browser
    _, _, tiny = served_model
    open_page(d, server)
    assert not d.find_element("id", "apikey-row").is_displayed()  # no key asked for: no key field
    assert d.find_element("id", "cancel").get_attribute("disabled") is not None
    assert d.find_element("id", "width").get_attribute("value") == "64"  # prefilled from the model
    if tiny:  # the counts the model was trained for, offered and named beside the steps field
        opts = d.find_elements("css selector", "#steps-trained option")
        assert [o.get_attribute("value") for o in opts] == ["4", "2"]
        assert d.find_element("id", "steps-hint").text == "(trained: 4, 2)"

    # errors: the page's own check, then the server's `detail`, both inline; no card appears
    d.find_element("id", "generate").click()
    wait_for(d, lambda d: d.find_element("id", "error").is_displayed(), 10, "the empty-prompt error")
    assert "prompt" in d.find_element("id", "error").text
    fill(d, "prompt", "grinning face, twemoji style")
    fill(d, "steps", 1000)
    d.find_element("id", "generate").click()
    wait_for(d, lambda d: "steps must be between 1 and 100" in d.find_element("id", "error").text, 10,
             "the server's error detail")
    assert cards(d) == []

    # a job of 4 images with a fixed seed: previews while it runs, then the images, their seeds, downloads
    if tiny:  # enough steps to stream previews; a real model keeps its own count (and tuned schedule)
        fill(d, "steps", 12)
    else:
        models = httpx.get(f"{server}/api/models", timeout=5).json()["models"]
        fill(d, "steps", next(m["steps"] for m in models if m["default"]))
    fill(d, "seed", 7)
    fill(d, "n", 4)
    d.find_element("id", "generate").click()
    card = new_card(d, 0)
    assert not d.find_element("id", "error").is_displayed()
    card = wait_card(d, card["id"], lambda c: c["previews"] >= 1 or c["state"] in TERMINAL, JOB_TIMEOUT,
                     "a first preview")
    card = wait_card(d, card["id"], lambda c: c["state"] in TERMINAL
                     and all(r["loaded"] for r in c["results"]), JOB_TIMEOUT, "the finished images")
    assert card["state"] == "done", card["status"]
    assert card["status"].startswith("done")
    assert card["previews"] >= 1  # every step event carried a preview, each one shown
    assert d.execute_script("return window.flowflashPreviews") >= card["previews"]
    assert len(card["results"]) == 4
    for r in card["results"]:
        assert (r["w"], r["h"]) == (64, 64)
        assert r["shown"] == 256 and r["rendering"] == "pixelated"  # small images shown large, pixel-sharp
    assert [ln["download"] for ln in card["links"]] == [f"flowflash-{s}.png" for s in (7, 8, 9, 10)]
    for ln, r in zip(card["links"], card["results"]):
        assert ln["href"].startswith("data:image/png;base64,") and ln["href"] == r["src"]
    png = Image.open(io.BytesIO(base64.b64decode(card["links"][0]["href"].split(",", 1)[1])))
    assert png.format == "PNG" and png.size == (64, 64)
    assert "seed 7" in card["text"]
    params = card["params"]
    assert params["prompt"] == "grinning face, twemoji style" and params["seeds"] == "7, 8, 9, 10"
    assert params["size"] == "64×64" and float(params["seconds"]) > 0 and "guidance" in params
    assert params["model"] == d.find_element("id", "model").get_attribute("value")
    if tiny:
        assert params["steps"] == "12"

    # Ctrl+Enter in the prompt submits another job; its card goes on top
    apple = "a red apple" if tiny else "red apple, fluent flat style"
    fill(d, "prompt", apple)
    fill(d, "seed", 3)
    fill(d, "n", 2)
    ActionChains(d).key_down(Keys.CONTROL).send_keys_to_element(d.find_element("id", "prompt"), Keys.ENTER) \
        .key_up(Keys.CONTROL).perform()
    second = new_card(d, 1)
    assert second["id"] != card["id"]
    second = wait_card(d, second["id"], lambda c: c["state"] in TERMINAL
                       and all(r["loaded"] for r in c["results"]), JOB_TIMEOUT, "the Ctrl+Enter job's images")
    assert second["state"] == "done" and len(second["results"]) == 2, second["status"]
    assert second["params"]["prompt"] == apple and second["params"]["seeds"] == "3, 4"
    if tiny:  # completed; the first job named its style, so its card shows no "drawn as"
        assert second["params"]["drawn as"] == "a red apple, twemoji style" and "drawn as" not in card["params"]
    assert [c["id"] for c in cards(d)] == [second["id"], card["id"]]  # newest first
    assert d.find_element("id", "prompt").get_attribute("value") == apple  # the shortcut typed no newline

    if tiny:  # the model names a default style: the page says so and can draw the prompt as typed instead
        assert d.find_element("id", "as-typed-row").is_displayed()
        assert '", twemoji style"' in d.find_element("id", "as-typed-hint").text
        d.find_element("id", "as-typed").click()
        d.find_element("id", "generate").click()
        third = new_card(d, 2)
        third = wait_card(d, third["id"], lambda c: c["state"] in TERMINAL and all(r["loaded"] for r in c["results"]),
                          JOB_TIMEOUT, "the as-typed job's images")
        assert third["state"] == "done" and third["params"]["prompt"] == apple and "drawn as" not in third["params"]
        d.find_element("id", "as-typed").click()  # off again

    assert off_origin_requests(d, server) == []  # no CDN, no web font, nothing but this server
    save_screenshot(d, tmp_path / "serve.png")
    if os.environ.get("FLOWFLASH_SCREENSHOT"):
        save_screenshot(d, Path(os.environ["FLOWFLASH_SCREENSHOT"]))
    assert script_errors(d) == []


def test_cancel_stops_running_and_queued_jobs(browser, server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    d = browser
    open_page(d, server)
    # a long job: 100 steps, 8 images, guidance on: seconds of work, cancelled long before it ends
    fill(d, "prompt", "a dog face")
    fill(d, "steps", 100)
    fill(d, "guidance", 4)
    fill(d, "n", 8)
    d.find_element("id", "generate").click()
    running = new_card(d, 0)
    running = wait_card(d, running["id"], lambda c: c["previews"] >= 1 or c["state"] in TERMINAL, JOB_TIMEOUT,
                        "the long job's first step")
    assert running["state"] == "running", running["status"]
    assert running["status"].startswith("step ") and running["status"].endswith("/100")
    assert running["preview"]["shown"] and (running["preview"]["w"], running["preview"]["h"]) == (8 * 64, 64)
    assert d.find_element("id", "cancel").get_attribute("disabled") is None

    # a second job waits behind it: it shows its place, and its own Cancel takes it out of the queue
    fill(d, "n", 1)
    ActionChains(d).key_down(Keys.CONTROL).send_keys_to_element(d.find_element("id", "prompt"), Keys.ENTER) \
        .key_up(Keys.CONTROL).perform()
    queued = new_card(d, 1)
    queued = wait_card(d, queued["id"], lambda c: c["status"].startswith("queued"), 20, "the queued job's place")
    assert queued["status"] == "queued: next"
    d.find_element("css selector", f'.job[data-id="{queued["id"]}"] button.cancel-job').click()
    queued = wait_card(d, queued["id"], lambda c: c["state"] == "cancelled", 20, "the queued job cancelled")
    assert queued["status"] == "cancelled"

    # the toolbar's Cancel stops the newest unfinished job: the running one
    d.find_element("id", "cancel").click()
    running = wait_card(d, running["id"], lambda c: c["state"] in TERMINAL, 20,
                        "the running job cancelled")
    assert running["status"] == "cancelled" and running["results"] == []
    assert d.find_element("id", "cancel").get_attribute("disabled") is not None

    # the server agrees: both jobs ended cancelled (the running one at its next step), the worker is idle
    end = time.monotonic() + 20
    while time.monotonic() < end and job_status(server, running["id"]) != "cancelled":
        time.sleep(0.05)
    assert job_status(server, running["id"]) == "cancelled"
    assert job_status(server, queued["id"]) == "cancelled"
    while time.monotonic() < end and httpx.get(f"{server}/api/status", timeout=5).json()["running"]:
        time.sleep(0.05)
    idle = httpx.get(f"{server}/api/status", timeout=5).json()
    assert (idle["queued"], idle["running"]) == (0, 0), idle
    assert off_origin_requests(d, server) == []
    assert script_errors(d) == []


def test_api_key_field_appears_on_401_and_is_remembered(browser, keyed_server):
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(keyed_server + "/")
    wait_for(d, lambda d: d.find_element("id", "apikey-row").is_displayed(), 20, "the API key field")
    assert "API key" in d.find_element("id", "error").text
    assert d.find_elements("css selector", "#model option") == []

    d.find_element("id", "apikey").send_keys(API_KEY, Keys.TAB)  # `change`: stored, the models load
    wait_for(d, lambda d: d.execute_script("return document.querySelectorAll('#model option').length > 0"), 20,
             "the models, with the key")
    assert not d.find_element("id", "error").is_displayed()
    assert d.execute_script("return localStorage.getItem('flowflash.apiKey')") == API_KEY

    # the job's events come through fetch with the key in a header (EventSource could not send it)
    fill(d, "prompt", "a banana")
    fill(d, "steps", 6)
    d.find_element("id", "generate").click()
    card = new_card(d, 0)
    card = wait_card(d, card["id"], lambda c: c["state"] in TERMINAL
                     and all(r["loaded"] for r in c["results"]), JOB_TIMEOUT, "the keyed job's image")
    assert card["state"] == "done" and len(card["results"]) == 1 and card["previews"] >= 1, card["status"]
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert job_status(keyed_server, card["id"], auth) == "done"

    # a reload finds the key in localStorage: no 401, no key field
    d.refresh()
    open_page(d, keyed_server)
    assert not d.find_element("id", "apikey-row").is_displayed()
    assert not d.find_element("id", "error").is_displayed()
    assert off_origin_requests(d, keyed_server) == []
    assert script_errors(d) == []

