"""Two llama.cpp engines behind one route (least outstanding), as on a machine with two GPUs.

Issue 10 runs this with one CUDA engine per GPU; here both run on the CPU (the
multi-GPU kinds are not lent), which exercises the same gateway path: the
load spreads over both, and killing one moves every request to the other
without a failed request.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from openai import OpenAI

from tests.support.engines import EngineProcess
from tests.support.gateway import gateway_process
from tests.support.load import background_load

pytestmark = pytest.mark.engine
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def pair(llamacpp_engine_factory, tiny_gguf: Path) -> list[EngineProcess]:
    # one thread each: two llama-servers spinning two threads apiece on a 2-core machine starve
    # one another, which would measure the scheduler instead of the gateway
    return [
        llamacpp_engine_factory(tiny_gguf, "tiny", ctx=4096, parallel=4, extra_args=("-t", "1"))
        for _ in range(2)
    ]


@pytest.fixture(scope="module")
def gateway(pair, tmp_path_factory: pytest.TempPathFactory):
    config = {
        "gateway": {"health_interval_s": 0.5},
        "engines": [
            {"name": f"gpu{i}", "kind": "llamacpp", "url": e.base_url, "models": ["tiny"],
             "circuit": {"failures": 1, "cooldown_s": 30}}
            for i, e in enumerate(pair)
        ],
        "routes": [{"model": "tiny", "engines": ["gpu0", "gpu1"],
                    "strategy": "least_outstanding"}],
    }  # fmt: skip
    gw = gateway_process(config, tmp_path_factory.mktemp("balance")).start(timeout=60)
    yield gw
    gw.stop()


def test_least_outstanding_spreads_then_fails_over(pair, gateway) -> None:
    client = OpenAI(base_url=f"{gateway.base_url}/v1", api_key="none", max_retries=0, timeout=60)

    def one_request() -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=MESSAGES, max_tokens=24
        )
        raw.parse()
        return raw.headers["x-kiban-engine"]

    with background_load(one_request, workers=6, max_requests=2000, max_seconds=6.0) as load:
        load.run_out()
    assert load.failure_count == 0, load.describe_failures()
    served = Counter(load.results)
    total = sum(served.values())
    print(f"requests per engine under load: {dict(served)}")
    assert total > 20 and min(served["gpu0"], served["gpu1"]) >= total * 0.25, served

    with background_load(one_request, workers=6, max_requests=2000, max_seconds=6.0) as load:
        time.sleep(1.5)
        pair[1].kill()  # one "GPU" engine dies under load
        killed_at = time.monotonic()
        load.run_out()
    # every request was answered, by the surviving engine when needed
    assert load.failure_count == 0, load.describe_failures()
    after = Counter()
    for _ in range(10):
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=MESSAGES, max_tokens=4
        )
        after[raw.headers["x-kiban-engine"]] += 1
    assert after == {"gpu0": 10} and time.monotonic() - killed_at < 60
