"""Clients that send anything: a schemathesis run, bad bodies, slow and flooding clients,
path tricks around auth, and a search for keys in everything the run wrote.

A real `kiban serve` with API keys (one from the environment, one from a
`kiban keys` file) in front of the fault-injecting upstream.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.engines import EngineProcess
from tests.support.gateway import KIBAN, add_key, fault_upstream, gateway_process

ENV_KEY = "sk-kiban-env-9c1e5ad7f3b24e60"
WRONG_KEY = "sk-kiban-wrong-71b3c0ffee42aa"
ST = Path(sys.executable).with_name("st")
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    up = fault_upstream(tmp_path_factory.mktemp("input")).start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gw")


@pytest.fixture(scope="module")
def file_key(work: Path) -> str:
    return add_key(work / "keys.yaml", "app")


@pytest.fixture(scope="module")
def gateway(upstream, work: Path, file_key: str):
    config = {
        "gateway": {
            "api_keys": {"env": ["KIBAN_INPUT_KEY"], "file": str(work / "keys.yaml")},
            "max_body_bytes": MAX_BODY,
            "health_interval_s": 0.5,
            "http": {"header_timeout_s": 1, "body_timeout_s": 1, "max_headers": 50},
        },
        "engines": [
            {"name": "up", "kind": "openai", "url": upstream.base_url, "models": ["ok"]},
        ],
        "routes": [{"model": "ok", "engines": ["up"]}],
    }
    gw = gateway_process(config, work, env={"KIBAN_INPUT_KEY": ENV_KEY}, name="input")
    gw.start(timeout=60)
    yield gw
    gw.stop()


def _raw(gw: EngineProcess, data: bytes, wait: float = 5.0) -> bytes:
    """Send *data* on a fresh connection; the first response (or all until it closes)."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=wait) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
                if _complete(out):
                    break
        except TimeoutError:
            pass
    return out


def _complete(response: bytes) -> bool:
    head, sep, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return bool(sep) and len(body) >= int(line.split(b":")[1])
    return False


def _status_and_error(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def _post(path: str, body: bytes, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: kiban", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


CHAT = b'{"model": "ok", "messages": [{"role": "user", "content": "hi"}]}'
AUTH = {"Authorization": f"Bearer {ENV_KEY}", "Content-Type": "application/json"}


# -- the OpenAPI document and a bounded schemathesis run ------------------------------------


def test_openapi_document_is_committed_and_served(gateway) -> None:
    from kiban.gateway.openapi import openapi_document

    committed = json.loads((Path(__file__).parents[2] / "docs" / "openapi.json").read_text())
    assert committed == openapi_document()
    served = httpx.get(gateway.base_url + "/openapi.json").json()
    assert served["paths"].keys() == committed["paths"].keys()
    model = served["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]
    assert model["examples"] == ["ok"]


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_odd_error(gateway) -> None:
    """Every check but positive_data_acceptance: whether a valid structured-output request
    is accepted depends on the route's engines (a constraint they cannot enforce is a 400)."""
    done = subprocess.run(
        [
            str(ST),
            "run",
            gateway.base_url + "/openapi.json",
            "-H",
            f"Authorization: Bearer {ENV_KEY}",
            "--max-examples",
            "60",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--request-timeout",
            "10",
            "--generation-deterministic",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-6000:]
    assert " passed" in done.stdout and "Traceback" not in gateway.log_tail(10**7)


# -- bodies ------------------------------------------------------------------------------------


def test_huge_body_413_and_connection_closed(gateway) -> None:
    big = b'{"model": "ok", "x": "' + b"a" * (MAX_BODY * 4) + b'"}'
    status, error = _status_and_error(_raw(gateway, _post("/v1/chat/completions", big, **AUTH)))
    assert status == 413 and error["code"] == "body_too_large"
    assert "gateway.max_body_bytes" in error["message"]
    chunked = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: k\r\nTransfer-Encoding: chunked\r\n"
        + f"Authorization: Bearer {ENV_KEY}\r\n\r\n".encode()
        + b"".join(b"%x\r\n%s\r\n" % (8192, b"a" * 8192) for _ in range(12))
        + b"0\r\n\r\n"
    )
    status, error = _status_and_error(_raw(gateway, chunked))
    assert status == 413


def test_deep_nesting_and_invalid_utf8_are_400(gateway) -> None:
    deep = b'{"model": "ok", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    resp = httpx.post(gateway.base_url + "/v1/chat/completions", content=deep, headers=AUTH)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    nested_schema = '{"type":"object","properties":{"a":' * 300 + "{}" + "}}" * 300
    body = (
        '{"model": "ok", "messages": [], "response_format": {"type": "json_schema", '
        f'"json_schema": {{"name": "x", "schema": {nested_schema}}}}}}}'
    )
    resp = httpx.post(gateway.base_url + "/v1/chat/completions", content=body, headers=AUTH)
    assert 400 <= resp.status_code < 500 and resp.json()["error"]["message"]
    bad = b'{"model": "ok\xff\xfe", "messages": []}'
    resp = httpx.post(gateway.base_url + "/v1/chat/completions", content=bad, headers=AUTH)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    answer = _raw(gateway, b"GET /v1/\xff\xfe HTTP/1.1\r\nHost: k\r\n\r\n")
    status, error = _status_and_error(answer)
    assert status == 400 and error["code"] == "invalid_http_request"


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("text/plain", 415),
        ("multipart/form-data; boundary=x", 415),
        ("application/x-www-form-urlencoded", 415),
        ("application/json; charset=utf-8", 200),
        ("application/vnd.api+json", 200),
    ],
)
def test_content_types(gateway, content_type: str, status: int) -> None:
    headers = {"Authorization": f"Bearer {ENV_KEY}", "Content-Type": content_type}
    resp = httpx.post(gateway.base_url + "/v1/chat/completions", content=CHAT, headers=headers)
    assert resp.status_code == status
    if status == 415:
        error = resp.json()["error"]
        assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]


# -- slow and flooding clients -------------------------------------------------------------------


def test_slowloris_headers_and_body_are_cut_off(gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as idle:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as trickle:
            trickle.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: k\r\n")
            started = time.monotonic()
            for i in range(30):  # one header line every 0.2 s: the headers never end in time
                try:
                    trickle.sendall(f"X-Slow-{i}: y\r\n".encode())
                except OSError:
                    break
                time.sleep(0.2)
                assert httpx.get(gateway.base_url + "/health").status_code == 200
            answer = trickle.recv(65536)
            assert time.monotonic() - started >= 1.0  # header_timeout_s, not earlier
        status, error = _status_and_error(answer)
        assert status == 408 and "gateway.http.header_timeout_s (1 s)" in error["message"]
        idle_answer = idle.recv(65536)  # connected, never sent a byte
        assert _status_and_error(idle_answer)[0] == 408
    body_head = _post("/v1/chat/completions", CHAT, **AUTH)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as slow_body:
        slow_body.sendall(body_head[: -len(CHAT)] + CHAT[:5])
        status, error = _status_and_error(slow_body.recv(65536))
    assert status == 408 and "gateway.http.body_timeout_s (1 s)" in error["message"]


def test_header_floods_431(gateway) -> None:
    many = "".join(f"X-Flood-{i}: v\r\n" for i in range(500))
    status, error = _status_and_error(
        _raw(gateway, f"GET /health HTTP/1.1\r\nHost: k\r\n{many}\r\n".encode())
    )
    assert status == 431 and "gateway.http.max_headers (50)" in error["message"]
    huge = "X-Huge: " + "h" * 200_000
    status, error = _status_and_error(
        _raw(gateway, f"GET /health HTTP/1.1\r\nHost: k\r\n{huge}\r\n\r\n".encode())
    )
    assert status == 431 and "max_header_bytes" in error["message"]
    assert httpx.get(gateway.base_url + "/health").status_code == 200


# -- keys: path tricks and leaks ------------------------------------------------------------------


TRICKS = [
    "/v1/../v1/chat/completions",
    "//v1/chat/completions",
    "/V1/chat/completions",
    "/v1/chat/completions/",
    "/v1/%2e%2e/v1/chat/completions",
    "/v1/chat%2fcompletions",
    "/./v1/chat/completions",
    "/v1/chat/completions%00",
    "/v1/chat/completions;x=1",
    "http://evil/v1/chat/completions",
    "/v1/../metrics",
]


def test_path_tricks_cannot_bypass_auth(gateway, upstream) -> None:
    before = httpx.get(upstream.base_url + "/stats").json()["total"]
    for path in TRICKS:
        for method in ("POST", "GET"):
            data = _post(path, CHAT) if method == "POST" else f"GET {path} HTTP/1.1\r\n".encode()
            if method == "GET":
                data += b"Host: k\r\n\r\n"
            status, error = _status_and_error(_raw(gateway, data))
            assert status in (400, 401, 404, 405), (path, method, status)
            assert error["message"], path
    for path in ("/v1/models", "/v1/models/", "//v1/models", "/V1/models"):
        answer = _raw(gateway, f"GET {path} HTTP/1.1\r\nHost: k\r\n\r\n".encode())
        assert _status_and_error(answer)[0] in (401, 404), path
    assert httpx.get(upstream.base_url + "/stats").json()["total"] == before  # nothing got in


def test_no_key_in_anything_the_run_wrote(gateway, upstream, work: Path, file_key: str) -> None:
    keyed = {"Content-Type": "application/json"}
    answers = []
    for key in (ENV_KEY, file_key, WRONG_KEY, f"{ENV_KEY}x"):
        for body in (CHAT, b'{"model": "missing", "messages": []}', b"{bad json"):
            resp = httpx.post(
                gateway.base_url + "/v1/chat/completions",
                content=body,
                headers={**keyed, "Authorization": f"Bearer {key}", "X-Api-Key": key},
            )
            answers.append(resp.text + json.dumps(dict(resp.headers)))
        answers.append(
            httpx.get(gateway.base_url + "/v1/models", headers={"Authorization": key}).text
        )
    answers.append(_raw(gateway, _post("/v1/chat/completions", CHAT, Authorization=key)).decode())
    config = work / "input.yaml"
    reload = subprocess.run(
        [str(KIBAN), "reload", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert reload.returncode == 0, reload.stderr
    answers += [reload.stdout, reload.stderr, httpx.get(gateway.base_url + "/metrics").text]
    written = [p for p in work.rglob("*") if p.is_file()]  # logs, state, keys file
    assert any(p.name == "input.log" for p in written)
    assert any(p.parent.name == "reload" for p in written)
    everything = "\n".join(answers) + "".join(
        p.read_text(errors="replace") for p in [*written, upstream.log_path]
    )
    assert "status" in everything and "route" in everything  # the logs are there
    for secret in (ENV_KEY, file_key, WRONG_KEY, file_key[9:25]):
        assert secret not in everything
