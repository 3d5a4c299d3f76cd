"""`flowflash serve`: load the models once, start the worker, run uvicorn on a loopback port."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

from ..errors import FlowflashError
from ..runtime.pipeline import Pipeline, resolve_model
from .jobs import Worker
from .server import Settings, create_app, is_loopback


def load_pipelines(models: list[str], drop=(), dtype: str = "fp32", device: str = "cpu") -> dict[str, Pipeline]:
    """Each model under its folder's name (shipped aliases resolve to e.g. emoji-student)."""
    out: dict[str, Pipeline] = {}
    for m in models or [None]:
        name = resolve_model(m).name if m is None or not str(m).endswith(".safetensors") else Path(m).stem
        if name in out:
            raise FlowflashError(f"two models are both named {name!r}: serve them from folders of different names")
        out[name] = Pipeline.load(m, drop=drop, dtype=dtype, device=device)
    return out


def check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise FlowflashError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port") from None


def serve(models: list[str] | None = None, host: str = "127.0.0.1", port: int = 7860, api_key: str | None = None,
          max_queue: int = 32, max_batch: int = 8, output_dir: Path | None = Path("outputs/serve"), drop=(),
          dtype: str = "fp32", device: str = "cpu", log_level: str = "warning") -> None:
    import uvicorn

    if not is_loopback(host) and not api_key:
        raise FlowflashError(f"refusing to listen on {host} without --api-key: anyone on the network could use "
                             "this machine; set a key, or keep the default 127.0.0.1")
    if api_key is not None and len(api_key) < 8:
        raise FlowflashError("--api-key must be at least 8 characters")
    if not 1 <= port <= 65535:
        raise FlowflashError(f"port must lie in 1..65535, got {port}")
    check_port(host, port)  # before the models load: a taken port should not cost their loading time
    pipes = load_pipelines(models or [], drop, dtype, device)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
    worker = Worker(pipes, max_queue=max_queue, max_batch=max_batch).start()
    app = create_app(worker, Settings(api_key=api_key, output_dir=output_dir))
    shown = f"[{host}]" if ":" in host else host
    print(f"flowflash serving {', '.join(pipes)} on http://{shown}:{port}  (OpenAI: /v1, AUTOMATIC1111: /sdapi/v1)",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
    finally:
        worker.stop()
