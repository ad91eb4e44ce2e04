"""The upstreams and the gateways a benchmark run starts, and the peers it installs.

Upstreams: Debian's nginx answering a fixed chat completion (``return 200``),
and bench/sse_upstream.py streaming as fast as it can. Gateways, each with
one engine behind it: kiban (``kiban serve``, the full feature path on),
LiteLLM proxy and vllm-router, pinned versions in venvs of their own under
~/.cache/kiban/bench/ (installed here on first use).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from procs import Service, free_port

BENCH_DIR = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("KIBAN_BENCH_CACHE", Path.home() / ".cache" / "kiban" / "bench"))
MODEL = "bench"
API_KEY = "kiban-bench-key"  # sent to every target; kiban checks it, the others ignore it
LITELLM = "litellm[proxy]==1.100.5"
VLLM_ROUTER = "vllm-router==0.1.17"
PY_SPY = "py-spy==0.4.3"

CHAT_COMPLETION = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you '
    'today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,'
    '"total_tokens":21}}'
)
_MODELS = '{"object":"list","data":[{"id":"bench","object":"model","owned_by":"nginx"}]}'


def nginx_binary() -> str:
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(found).exists():
        raise SystemExit("nginx is missing: run scripts/bootstrap.sh (Debian package nginx)")
    return found


def nginx(work: Path, cpus: str | None) -> tuple[Service, str]:
    """One nginx worker answering the fixed completion; returns it and its base URL."""
    port = free_port()
    root = work / "nginx"
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    conf = root / "nginx.conf"
    conf.write_text(
        f"""worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {root}/tmp/body;
  proxy_temp_path {root}/tmp/proxy;
  fastcgi_temp_path {root}/tmp/fastcgi;
  uwsgi_temp_path {root}/tmp/uwsgi;
  scgi_temp_path {root}/tmp/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /v1/chat/completions {{
      default_type application/json;
      return 200 '{CHAT_COMPLETION}';
    }}
    location = /v1/models {{ default_type application/json; return 200 '{_MODELS}'; }}
    location = /health {{ default_type application/json; return 200 '{{"status":"ok"}}'; }}
  }}
}}
"""
    )
    argv = [nginx_binary(), "-c", str(conf), "-p", str(root), "-e", str(root / "error.log")]
    return Service("nginx", argv, work / "nginx.log", cpus=cpus), f"http://127.0.0.1:{port}"


def sse_upstream(
    work: Path, cpus: str | None, tokens: int, interval_s: float = 0.0
) -> tuple[Service, str]:
    """The SSE upstream: back to back (*interval_s* 0), or one event per interval like an engine."""
    port = free_port()
    argv = [
        sys.executable,
        str(BENCH_DIR / "sse_upstream.py"),
        "--port",
        str(port),
        "--tokens",
        str(tokens),
        "--interval",
        str(interval_s),
    ]
    name = "sse-upstream" if not interval_s else "sse-upstream-paced"
    return Service(name, argv, work / f"{name}.log", cpus=cpus), f"http://127.0.0.1:{port}"


# -- gateways ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gateway:
    """How to start one gateway in front of one upstream."""

    key: str
    label: str
    slow: bool  # gets the smaller request counts
    pinned: bool  # runs on the gateway CPU only (False: on every CPU)
    start: Callable[[Path, str, str | None], tuple[Service, str]]  # (work, upstream, cpus)


def kiban(
    workers: int,
    strategy: str | None = None,
    engines: int = 1,
    settings: dict[str, object] | None = None,
) -> Gateway:
    """kiban with *workers* workers; *strategy*: the route's, over *engines* engines that
    all point at the one upstream (a strategy needs a choice to make); *settings*: more
    keys of its ``gateway`` section."""

    def start(work: Path, upstream: str, cpus: str | None) -> tuple[Service, str]:
        port = free_port()
        name = f"kiban-{workers}w-{port}"
        names = ["upstream"] if engines == 1 else [f"upstream-{i}" for i in range(engines)]
        route: dict[str, object] = {"model": MODEL, "engines": names}
        if strategy is not None:
            route["strategy"] = strategy
        config = {
            "gateway": {
                "host": "127.0.0.1",
                "port": port,
                "workers": workers,
                "api_keys": {"env": ["KIBAN_BENCH_KEY"]},
                "request_log": True,
                **(settings or {}),
            },
            "engines": [
                {"name": n, "kind": "openai", "url": upstream, "models": [MODEL]} for n in names
            ],
            "routes": [route],
        }
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        kiban_bin = str(Path(sys.executable).with_name("kiban"))
        argv = [kiban_bin, "serve", "-c", str(path), "--log-level", "warning"]
        # the access log (one JSON line per request) goes to this file: the request log is on
        env = {"KIBAN_BENCH_KEY": API_KEY}
        return Service(name, argv, work / f"{name}.log", env, cpus), f"http://127.0.0.1:{port}"

    label = f"kiban, {workers} worker{'s' * (workers > 1)}"
    key = f"kiban-{workers}"
    if strategy is not None:
        label += f", {strategy} over {engines} engines"
        key += f"-{strategy}"
    return Gateway(key, label, slow=False, pinned=workers == 1, start=start)


def litellm() -> Gateway:
    def start(work: Path, upstream: str, cpus: str | None) -> tuple[Service, str]:
        venv = ensure_venv("litellm-1.100.5", LITELLM)
        port = free_port()
        config = {
            "model_list": [
                {
                    "model_name": MODEL,
                    "litellm_params": {
                        "model": f"openai/{MODEL}",
                        "api_base": f"{upstream}/v1",
                        "api_key": "none",
                    },
                }
            ]
        }
        path = work / f"litellm-{port}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [
            str(venv / "bin" / "litellm"),
            "--config",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ]
        env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}
        log = work / f"litellm-{port}.log"
        return Service("litellm", argv, log, env, cpus), f"http://127.0.0.1:{port}"

    return Gateway("litellm", "LiteLLM proxy 1.100.5, 1 worker", True, True, start)


def vllm_router() -> Gateway:
    def start(work: Path, upstream: str, cpus: str | None) -> tuple[Service, str]:
        venv = ensure_venv("vllm-router-0.1.17", VLLM_ROUTER)
        port = free_port()
        argv = [
            str(venv / "bin" / "vllm-router"),
            "--worker-urls",
            upstream,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--policy",
            "round_robin",
        ]
        log = work / f"vllm-router-{port}.log"
        return Service("vllm-router", argv, log, {}, cpus), f"http://127.0.0.1:{port}"

    return Gateway("vllm-router", "vllm-router 0.1.17 (Rust), round_robin", False, True, start)


# -- peers' environments ----------------------------------------------------------------------


def ensure_venv(name: str, requirement: str) -> Path:
    """A venv under the cache with *requirement* installed from PyPI (once)."""
    venv = CACHE / name
    stamp = venv / ".kiban-installed"
    if stamp.exists() and stamp.read_text().strip() == requirement:
        return venv
    print(f"installing {requirement} into {venv} (once)", file=sys.stderr, flush=True)
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    result = subprocess.run([*pip, requirement], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"pip install {requirement} failed:\n{result.stdout}{result.stderr}")
    stamp.write_text(requirement + "\n")
    return venv
