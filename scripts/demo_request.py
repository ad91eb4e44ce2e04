"""Send a chat request (whole and streamed) through the kiban gateway with the openai SDK."""

from __future__ import annotations

import sys
import time

from openai import OpenAI


def main(base_url: str = "http://127.0.0.1:8080/v1", model: str = "tiny") -> None:
    client = OpenAI(base_url=base_url, api_key="none", max_retries=2)
    messages = [{"role": "user", "content": "Say something about licences."}]
    for _ in range(2):  # least outstanding with rotation: one request each
        started = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=24
        )
        reply = raw.parse()
        print(
            f"engine {raw.headers['x-kiban-engine']}, {reply.usage.completion_tokens} tokens "
            f"in {time.perf_counter() - started:.2f} s: {reply.choices[0].message.content!r}"
        )
    print("streamed: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print("\n(random weights: the text is meaningless, the plumbing is real)")


if __name__ == "__main__":
    main(*sys.argv[1:])
