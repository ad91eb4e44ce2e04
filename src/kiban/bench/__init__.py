"""`kiban bench`: a load generator for OpenAI-compatible endpoints.

Closed loop (N clients, each sending its next request when the previous one
ends) or open loop (Poisson arrivals at a fixed rate), streaming or not, chat
or completions, bounded by a request count and/or a duration.

The client is an asyncio protocol on uvloop with httptools parsing the
responses, one keep-alive HTTP/1.1 connection per client: measured against
nginx's fixed response on one core it costs about 9 µs per request, where
aiohttp's client costs about 80 µs and pyreqwest's about 30 µs (see
docs/benchmarks.md), so the generator is rarely what limits a run. Streams
are timed by scanning the SSE bytes as they arrive; no chunk's JSON is parsed
(token counts come from the ``usage`` of the last chunk).
"""

from kiban.bench.recorder import Summary
from kiban.bench.runner import LoadRunner, LoadShape
from kiban.bench.workload import Workload

__all__ = ["LoadRunner", "LoadShape", "Summary", "Workload"]
