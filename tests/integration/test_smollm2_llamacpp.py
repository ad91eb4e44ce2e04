"""A real instruction-tuned model (SmolLM2-135M-Instruct) through kiban to llama.cpp."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import gguf
import openai
import pytest
from tokenizers import Tokenizer

from kiban.models.smollm2 import SYSTEM_PROMPT
from tests.support.engines import EngineProcess
from tests.support.inprocess_gateway import running_gateway

pytestmark = pytest.mark.engine

#: English, digits (split one by one), Japanese with full-width digits, code, special tokens
TOKENIZER_SAMPLES = (
    "What is the capital of France?",
    "On 2024-03-05 Maria paid $1,250.00 to Blue Harbor Ltd.",
    "株式会社サクラ電機に１２，５００円を支払いました。",  # noqa: RUF001
    "def add(a, b):\n    return a + b  # sum\n\n\n",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "naïve café, Zürich — “quotes” and emoji 🙂",
)


@pytest.fixture(scope="module")
def engine(llamacpp_engine_factory, smollm2_gguf: Path) -> EngineProcess:
    return llamacpp_engine_factory(smollm2_gguf, "smollm2", ctx=2048, parallel=1)


@pytest.fixture(scope="module")
def client(engine: EngineProcess):
    llama = {"name": "l", "kind": "llamacpp", "url": engine.base_url, "models": ["smollm2"]}
    config = {"engines": [llama], "routes": [{"model": "smollm2", "engines": ["l"]}]}
    with running_gateway(config) as gateway:
        yield openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0)


def test_the_wheel_holds_the_model_kiban_describes(smollm2_gguf: Path) -> None:
    fields = gguf.GGUFReader(str(smollm2_gguf)).fields
    meta = {k: fields[k].contents() for k in fields if not k.startswith("tokenizer.ggml.")}
    assert meta["general.architecture"] == "llama"
    assert (meta["llama.block_count"], meta["llama.embedding_length"]) == (30, 576)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (9, 3)
    assert meta["llama.context_length"] == 8192
    assert "<|im_start|>" in meta["tokenizer.chat_template"]  # ChatML


def test_answers_the_capital_of_france(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        max_tokens=32,
        temperature=0,
    )
    assert "Paris" in reply.choices[0].message.content


def test_tokenizer_of_the_hf_folder_is_llamacpps(engine: EngineProcess, smollm2_hf_dir) -> None:
    """vLLM reads the tokenizer kiban rebuilt from the GGUF: it must split text as llama.cpp."""
    ours = Tokenizer.from_file(str(smollm2_hf_dir / "tokenizer.json"))
    for text in TOKENIZER_SAMPLES:
        body = {"content": text, "add_special": False, "parse_special": True}
        request = urllib.request.Request(
            f"{engine.base_url}/tokenize",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            theirs = json.loads(resp.read())["tokens"]
        assert ours.encode(text).ids == theirs, text
