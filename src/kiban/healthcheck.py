"""``python -m kiban.healthcheck [URL]``: exit 0 when URL answers 2xx, 1 otherwise.

The gateway image's HEALTHCHECK and the Compose healthchecks of kiban's own
services use it: the slim image has no curl, and this needs nothing beyond the
standard library. URL defaults to ``$KIBAN_HEALTH_URL``, then the gateway's
default address.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8080/health"
TIMEOUT_S = 4.0


def check(url: str, timeout_s: float = TIMEOUT_S) -> str | None:
    """None when *url* answers with a 2xx status; else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as err:
        return f"{url}: HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        return f"{url}: {getattr(err, 'reason', err)}"
    return None if 200 <= status < 300 else f"{url}: HTTP {status}"


def main(argv: list[str]) -> int:
    url = argv[0] if argv else os.environ.get("KIBAN_HEALTH_URL", DEFAULT_URL)
    problem = check(url)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
