"""Load test of `flowflash serve` on loopback: sequential vs concurrent clients, then a sustained run.

    python scripts/load_serve.py --out docs/bench/serve-load     # default student, 60 s at 32 clients

Starts its own server (a subprocess of the CLI), drives it with httpx client threads (each keeps one request
in flight: POST /v1/images/generations, n=1, its own prompt and seed), and reads the server's RSS from /proc.
Writes OUT.json and prints a markdown table."""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

PROMPTS = ["red apple", "grinning face", "dog face", "banana", "blue heart", "frog face", "sun with face",
           "pizza", "rocket", "cat face", "green apple", "crying face", "fire", "snowman", "watermelon"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) / 1024
    return out


def drive(url: str, clients: int, seconds: float, style: str, seed0: int) -> dict:
    """`clients` threads, each sending a request as soon as its last one answered, for `seconds`."""
    lat, errors, lock = [], [], threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(k: int):
        with httpx.Client(base_url=url, timeout=120) as c:
            i = 0
            while time.monotonic() < stop_at:
                body = {"prompt": f"{PROMPTS[(k + i) % len(PROMPTS)]}, {style} style", "n": 1,
                        "seed": seed0 + 1000 * k + i}
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/images/generations", json=body)
                    ok = r.status_code == 200 and len(r.json()["data"]) == 1
                    err = None if ok else f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as e:
                    err = f"{type(e).__name__}: {e}"
                dt = time.monotonic() - t0
                with lock:
                    (errors.append(err) if err else lat.append(dt))
                i += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0  # includes the requests still in flight at the deadline
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else [float("nan")] * 19
    return {"clients": clients, "seconds": round(wall, 2), "requests": len(lat) + len(errors), "ok": len(lat),
            "errors": len(errors), "error_samples": errors[:3], "images_per_s": round(len(lat) / wall, 2),
            "p50_s": round(statistics.median(lat), 4) if lat else None, "p95_s": round(q[18], 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="as for flowflash serve (default: the shipped student)")
    ap.add_argument("--seconds", type=float, default=60.0, help="the sustained run at --clients")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--compare-seconds", type=float, default=20.0, help="each of sequential and 8 clients")
    ap.add_argument("--out", required=True, help="results path stem (.json)")
    a = ap.parse_args()

    port = free_port()
    cmd = [sys.executable, "-m", "flowflash.cli", "serve", "--port", str(port), "--output-dir", "/tmp/ff-load-out"]
    if a.model:
        cmd += ["--model", a.model]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > end or proc.poll() is not None:
                raise SystemExit(f"server did not start: {proc.stderr.read() if proc.poll() is not None else ''}")
            time.sleep(0.2)
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        drive(url, 4, 3, "twemoji", 10**6)  # warm-up: first calls pay for lazy imports and allocations
        start = rss_mb(proc.pid)
        seq = drive(url, 1, a.compare_seconds, "twemoji", 0)
        eight = drive(url, 8, a.compare_seconds, "twemoji", 10**5)
        after_compare = rss_mb(proc.pid)
        timeline, done = [], threading.Event()

        def sample_rss():  # the server's RSS every 5 s of the sustained run: a plateau, or growth
            while not done.wait(5.0):
                timeline.append(round(rss_mb(proc.pid)["VmRSS"], 1))
        sampler = threading.Thread(target=sample_rss)
        sampler.start()
        sustained = drive(url, a.clients, a.seconds, "fluent", 2 * 10**5)
        done.set()
        sampler.join()
        end_rss = rss_mb(proc.pid)
        batches = httpx.get(f"{url}/api/status").json()
    finally:
        proc.terminate()
        proc.wait(10)
    res = {"model": model, "cpus": os.cpu_count(), "sequential": seq, "eight_clients": eight,
           "sustained": sustained, "speedup_8_vs_sequential": round(eight["images_per_s"] / seq["images_per_s"], 2),
           "speedup_sustained_vs_sequential": round(sustained["images_per_s"] / seq["images_per_s"], 2),
           "rss_mb": {"start": round(start["VmRSS"], 1), "after_8_clients": round(after_compare["VmRSS"], 1),
                      "end": round(end_rss["VmRSS"], 1), "peak": round(end_rss["VmHWM"], 1),
                      "sustained_every_5s": timeline},
           "served": batches["served"], "mean_images_per_call": batches["mean_batch"], "command": " ".join(["python", *sys.argv])}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(res, indent=1))
    print("| run | clients | s | requests | errors | images/s | vs sequential | p50 s | p95 s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in (("sequential", seq), ("8 clients", eight), ("sustained", sustained)):
        print(f"| {name} | {r['clients']} | {r['seconds']} | {r['requests']} | {r['errors']} | {r['images_per_s']} | "
              f"{r['images_per_s'] / seq['images_per_s']:.2f}x | {r['p50_s']} | {r['p95_s']} |")
    print(f"server RSS MB: {res['rss_mb']}")


if __name__ == "__main__":
    main()
