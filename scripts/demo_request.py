"""Ask SmolLM2 through the kiban gateway: a question on each engine, a stream, an extraction."""

from __future__ import annotations

import sys
import time

from openai import OpenAI
from pydantic import BaseModel

import kiban
from kiban.models.smollm2 import SYSTEM_PROMPT

TEXT = (
    "Maria Rossi of Blue Harbor Ltd ordered 3 boxes of printer paper on March 5, 2024, "
    "for a total of 37.50 EUR."
)


class Order(BaseModel):
    customer: str
    company: str
    product: str
    quantity: int
    total: float
    currency: str


def main(base_url: str = "http://127.0.0.1:8080/v1", model: str = "smollm2") -> None:
    client = OpenAI(base_url=base_url, api_key="none", max_retries=2)
    question = [
        {"role": "system", "content": SYSTEM_PROMPT},  # without it, SmolLM2's answers wander
        {"role": "user", "content": "What is the capital of France?"},
    ]
    for _ in range(2):  # least outstanding with rotation: one request each
        started = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=question, max_tokens=48, temperature=0
        )
        reply = raw.parse()
        print(
            f"engine {raw.headers['x-kiban-engine']}, {reply.usage.completion_tokens} tokens "
            f"in {time.perf_counter() - started:.2f} s: {reply.choices[0].message.content!r}"
        )
    print("streamed: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model, messages=question, max_tokens=48, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print(f"\n\nkiban.extract(Order, ...) from: {TEXT!r}")
    started = time.perf_counter()
    order = kiban.extract(
        Order,
        [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Extract the order from this text as JSON.\n\n{TEXT}"},
        ],
        model=model,
        client=client,
        max_tokens=200,
        temperature=0,
    )
    print(f"{type(order).__name__} in {time.perf_counter() - started:.2f} s (schema enforced):")
    for field, value in order.model_dump().items():
        print(f"  {field:9} {value!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
