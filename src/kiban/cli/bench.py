"""`kiban bench`: load an OpenAI-compatible endpoint and report latency and throughput."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from kiban.cli.app import app, console, fail, out


@app.command()
def bench(
    url: Annotated[
        str,
        typer.Argument(
            help="Server root (http://127.0.0.1:8000), API base (.../v1) or endpoint URL "
            "(.../v1/chat/completions).",
            show_default=False,
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model to ask for; default: the first one listed."),
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="chat or completions; default: from the URL, else chat.")
    ] = None,
    stream: Annotated[bool, typer.Option(help="Stream the answers (SSE).")] = False,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, help="Closed loop: concurrent clients.")
    ] = 8,
    rate: Annotated[
        float | None,
        typer.Option(
            "--rate", "-r", min=0.001, help="Open loop: Poisson arrivals at this many req/s."
        ),
    ] = None,
    max_connections: Annotated[
        int, typer.Option(min=1, help="Open loop: most connections at once.")
    ] = 1024,
    requests: Annotated[
        int | None,
        typer.Option(
            "--requests", "-n", min=1, help="Requests to send (default: 1000 when no --duration)."
        ),
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option("--duration", "-d", min=0.001, help="Stop sending after this many seconds."),
    ] = None,
    warmup: Annotated[int, typer.Option(min=0, help="Requests sent first, not counted.")] = 0,
    max_tokens: Annotated[
        int, typer.Option(min=0, help="max_tokens of each request (0: leave it out).")
    ] = 128,
    prompt: Annotated[str | None, typer.Option(help="The prompt of every request.")] = None,
    prompt_file: Annotated[
        Path | None,
        typer.Option(help="Prompts, one a line, used in turn.", exists=True, dir_okay=False),
    ] = None,
    extra_body: Annotated[
        str | None,
        typer.Option(help="JSON merged into each body, e.g. '{\"temperature\":0}'."),
    ] = None,
    header: Annotated[
        list[str] | None, typer.Option("--header", "-H", help="Extra header 'Name: value'.")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="KIBAN_BENCH_API_KEY", help="Sent as 'Authorization: Bearer KEY'."),
    ] = None,
    usage: Annotated[
        bool, typer.Option(help="Streams: ask for token usage (stream_options.include_usage).")
    ] = True,
    timeout: Annotated[float, typer.Option(min=0.001, help="Seconds allowed per request.")] = 600,
    seed: Annotated[int | None, typer.Option(help="Seed of the open loop's arrivals.")] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON instead of a table.")
    ] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write the JSON result here.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Load an OpenAI-compatible endpoint; report requests/s, latency, TTFT, ITL, tokens/s.

    Closed loop by default (--concurrency clients back to back); --rate makes
    it an open loop with Poisson arrivals. Stops after --requests or
    --duration, whichever comes first.
    """
    import uvloop

    from kiban.bench.report import render, to_json
    from kiban.bench.runner import LoadRunner, LoadShape
    from kiban.bench.workload import (
        DEFAULT_PROMPT,
        ENDPOINT_PATHS,
        Destination,
        Workload,
        WorkloadError,
        parse_header,
    )

    chosen = next((e for e in ENDPOINT_PATHS if e == endpoint), None)
    if endpoint is not None and chosen is None:
        raise fail(f"--endpoint: expected chat or completions (got {endpoint!r})")
    try:
        target = Destination.from_url(url, chosen)
        headers = tuple(parse_header(h) for h in header or ())
    except WorkloadError as err:
        raise fail(str(err)) from None
    prompts = _prompts(prompt, prompt_file) or (DEFAULT_PROMPT,)
    body = _extra_body(extra_body)
    if requests is None and duration is None:
        requests = 1000
    shape = LoadShape(
        concurrency=concurrency,
        rate=rate,
        max_connections=max_connections,
        requests=requests,
        duration_s=duration,
        warmup=warmup,
        timeout_s=timeout,
        seed=seed,
    )

    async def main() -> tuple[Any, Any]:
        workload = Workload(
            target=target,
            model=model or "",
            stream=stream,
            max_tokens=max_tokens or None,
            prompts=prompts,
            extra_body=body,
            headers=headers,
            api_key=api_key,
            include_usage=usage,
        )
        if not model:
            probe = LoadRunner(workload, shape)
            try:
                found = await probe.discover_model()
            except (OSError, TimeoutError, RuntimeError) as exc:
                raise fail(f"cannot find a model at {target.url} (give --model): {exc}") from None
            workload = Workload(**{**workload.__dict__, "model": found})
        runner = LoadRunner(workload, shape)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, runner.stop)
        progress = None if quiet else asyncio.ensure_future(_progress(runner, shape))
        try:
            recorder = await runner.run()
        finally:
            if progress is not None:
                progress.cancel()
                await asyncio.gather(progress, return_exceptions=True)
            loop.remove_signal_handler(signal.SIGINT)
        summary = recorder.summary()
        if runner.stopped:
            summary.notes.append("stopped early (Ctrl+C): the figures cover what was sent")
        return workload, summary

    workload, summary = uvloop.run(main())
    _add_notes(summary, workload)
    document = to_json(summary, workload, shape)
    if output is not None:
        output.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    if json_out:
        typer.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    else:
        out.print(render(summary, workload, shape))
    if summary.requests and not summary.ok:
        raise typer.Exit(1)


def _prompts(prompt: str | None, prompt_file: Path | None) -> tuple[str, ...]:
    prompts: list[str] = [prompt] if prompt else []
    if prompt_file is not None:
        prompts += [line for line in prompt_file.read_text("utf-8").splitlines() if line.strip()]
        if not prompts:
            raise fail(f"--prompt-file: {prompt_file} has no non-empty line")
    return tuple(prompts)


def _extra_body(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as err:
        raise fail(f"--extra-body: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise fail(f"--extra-body: expected a JSON object (got {text!r})")
    return value


def _add_notes(summary: Any, workload: Any) -> None:
    if summary.duration_s > 0 and summary.client_cpu_s / summary.duration_s > 0.9:
        summary.notes.append(
            "the load generator kept a core busy: the server may be faster than measured "
            "(run several kiban bench processes, or use fewer clients per process)"
        )
    if workload.stream and summary.ok and not summary.token_events:
        summary.notes.append("no chunk carried text: time to first token is unknown")
    if summary.ok and summary.usage_missing:
        summary.notes.append(
            f"{summary.usage_missing:,} answers had no usage block"
            + ("; their output tokens were counted as chunks with text" if workload.stream else "")
        )


async def _progress(runner: Any, shape: Any) -> None:
    """A progress bar on stderr: requests done out of --requests, or seconds out of --duration."""
    from time import perf_counter

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    by_count = shape.requests is not None
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("warming up" if shape.warmup else "running", total=None, detail="")
        try:
            while True:
                rec = runner.current
                if runner.warming_up:
                    bar.update(task, total=shape.warmup, completed=rec.finished, detail="")
                else:
                    elapsed = perf_counter() - rec.started if rec.started else 0.0
                    done = rec.finished
                    total = shape.requests if by_count else shape.duration_s
                    bar.update(
                        task,
                        description="running",
                        total=total,
                        completed=done if by_count else min(elapsed, total),
                        detail=f"{done:,} done, {rec.errors.total():,} failed, "
                        f"{done / elapsed if elapsed > 0 else 0:,.0f}/s",
                    )
                await asyncio.sleep(0.25)
        except asyncio.CancelledError:
            pass
