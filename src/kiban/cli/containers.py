"""`kiban compose`, `kiban render k8s`, and what `kiban up --docker` / `down --docker` run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml
from rich.live import Live
from rich.table import Table

from kiban.cli.app import ConfigOption, app, console, fail, out
from kiban.config import KibanConfig, load_config

if TYPE_CHECKING:
    from kiban.deploy.compose import ComposeProject
    from kiban.deploy.docker import ServiceState
    from kiban.sizing.plan import Plan

render_app = typer.Typer(help="Deployment files for other platforms.", no_args_is_help=True)
app.add_typer(render_app, name="render")

GpuOption = Annotated[
    str | None,
    typer.Option("--gpu", help="Plan on GPUs of this type (e.g. h100-80), not this machine's."),
]
GpuMemoryOption = Annotated[
    str | None, typer.Option("--gpu-memory", help="Plan on GPUs of this size (e.g. 24GiB).")
]
GpuCountOption = Annotated[int, typer.Option("--gpus", min=1, help="How many such GPUs.")]
#: Docker's own time to pull and start, on top of the slowest engine's ready_timeout_s
_DOCKER_SLACK_S = 300.0


def _plan(cfg: KibanConfig, gpu: str | None, gpu_memory: str | None, count: int) -> Plan:
    from kiban.planning.inventory import gpus_from_options
    from kiban.planning.plan import plan_config

    gpus = None
    if gpu is not None or gpu_memory is not None:
        try:
            gpus = gpus_from_options(gpu, gpu_memory, count)
        except ValueError as err:
            raise fail(f"--gpu/--gpu-memory: {err}") from None
    return plan_config(cfg, gpus)


def render_compose_project(
    config: Path,
    out_dir: Path,
    gpu: str | None = None,
    gpu_memory: str | None = None,
    gpu_count: int = 1,
    project: str | None = None,
) -> ComposeProject:
    """Plan, then write the Compose project; exits with every problem when it cannot run."""
    from kiban.deploy.compose import render_compose
    from kiban.deploy.containers import ContainerError, load_raw

    cfg = load_config(config)
    plan = _plan(cfg, gpu, gpu_memory, gpu_count)
    try:
        return render_compose(cfg, load_raw(config), config, out_dir, plan, project=project)
    except ContainerError as err:
        raise err.within(f"cannot run {config} in containers") from None


@app.command()
def compose(
    config: ConfigOption = Path("kiban.yaml"),
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory to write into.")] = Path(
        "compose"
    ),
    gpu: GpuOption = None,
    gpu_memory: GpuMemoryOption = None,
    gpu_count: GpuCountOption = 1,
    project: Annotated[
        str | None, typer.Option(help="Compose project name (default: kiban-<config name>).")
    ] = None,
) -> None:
    """Write a Docker Compose project: the engines in their official images with the
    plan's flags and GPUs, the gateway, the GPU exporter, Prometheus and Grafana."""
    done = render_compose_project(config, out_dir, gpu, gpu_memory, gpu_count, project)
    typer.echo(f"wrote {done.compose_file} (project {done.project})")
    for engine in done.engines:
        gpus = ",".join(map(str, engine.gpus)) or engine.device
        typer.echo(f"  {engine.service}: {engine.image.image} on {gpus}")
    if done.secrets:
        typer.echo(
            "the gateway takes from the environment (or a .env file beside compose.yaml): "
            + ", ".join(done.secrets)
        )
    typer.echo(f"run: docker compose -f {done.compose_file} up -d --build   (or kiban up --docker)")


@render_app.command("k8s")
def render_k8s_cmd(
    config: ConfigOption = Path("kiban.yaml"),
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory to write into.")] = Path(
        "k8s"
    ),
    name: Annotated[str, typer.Option(help="Prefix of every object's name.")] = "kiban",
    namespace: Annotated[str | None, typer.Option(help="Namespace of the objects.")] = None,
    replicas: Annotated[int, typer.Option(min=1, help="Gateway replicas.")] = 2,
    gateway_image: Annotated[
        str | None, typer.Option(help="The gateway image as your cluster pulls it.")
    ] = None,
    storage_class: Annotated[
        str | None, typer.Option(help="Storage class of the model cache claims.")
    ] = None,
    model_cache_size: Annotated[
        str | None, typer.Option(help="Size of each model cache claim (default: from the model).")
    ] = None,
    gpu: GpuOption = None,
    gpu_memory: GpuMemoryOption = None,
    gpu_count: GpuCountOption = 1,
) -> None:
    """Write Kubernetes manifests: gateway Deployment + Service, one Deployment per engine
    with GPU requests and probes, model cache claims, ServiceMonitors and alert rules."""
    from kiban.deploy.compose import GATEWAY_IMAGE
    from kiban.deploy.containers import ContainerError, load_raw
    from kiban.deploy.k8s import K8sOptions, check_name, render_k8s, write_manifests

    if (problem := check_name(name)) is not None:
        raise fail(problem)
    cfg = load_config(config)
    plan = _plan(cfg, gpu, gpu_memory, gpu_count)
    options = K8sOptions(
        name=name,
        namespace=namespace,
        replicas=replicas,
        gateway_image=gateway_image or GATEWAY_IMAGE,
        storage_class=storage_class,
        model_cache_size=model_cache_size,
    )
    try:
        manifests = render_k8s(cfg, load_raw(config), plan, options)
    except ContainerError as err:
        raise err.within(f"cannot run {config} on Kubernetes") from None
    for path in write_manifests(manifests, out_dir):
        typer.echo(f"wrote {path}")
    for note in manifests.notes:
        typer.echo(f"note: {note}")
    literals = " ".join(f"--from-literal={key}=..." for key in sorted(manifests.secret_keys))
    typer.echo(
        f"create the secret first: kubectl create secret generic {manifests.secret} {literals}"
    )
    typer.echo(f"then: kubectl apply -f {out_dir}")


# -- kiban up --docker / down --docker ---------------------------------------------------


def _compose_dir(config: Path) -> Path:
    from kiban.run_state import RunDir

    return RunDir(config).root / "compose"


def _states_table(states: list[ServiceState], started: float) -> Table:
    table = Table(
        title=f"docker compose ({time.monotonic() - started:.0f} s)", title_justify="left"
    )
    for column in ("service", "state", "health"):
        table.add_column(column)
    for s in states:
        style = "green" if s.ready else "bold red" if s.failed else "yellow"
        table.add_row(s.service, f"[{style}]{s.state}[/]", s.health or "-")
    return table


def docker_up(config: Path) -> None:
    """Render the project into .kiban/<config>/compose, start it, wait until all is healthy."""
    from kiban.deploy.docker import DockerError, compose_up, require_docker, wait_healthy

    try:
        require_docker()
    except DockerError as err:
        raise err.within("kiban up --docker") from None
    done = render_compose_project(config, _compose_dir(config))
    console.print(f"project {done.project}: {done.compose_file}", highlight=False)
    timeout = max((e.ready_timeout_s for e in done.engines), default=60.0) + _DOCKER_SLACK_S
    started = time.monotonic()
    try:
        compose_up(done.compose_file, done.project)
        with Live(console=console, transient=True) as live:
            states = wait_healthy(
                done.compose_file,
                done.project,
                timeout,
                tick=lambda s: live.update(_states_table(s, started)),
            )
    except DockerError as err:
        raise err.within("kiban up --docker") from None
    out.print(_states_table(states, started))
    console.print(f"up; stop with: kiban down --docker -c {config}", highlight=False)


def docker_down(config: Path) -> None:
    from kiban.deploy.compose import COMPOSE_FILE
    from kiban.deploy.docker import DockerError, compose_down, require_docker

    compose_file = _compose_dir(config) / COMPOSE_FILE
    try:
        require_docker()
        if not compose_file.exists():
            raise DockerError(f"kiban is not up with --docker for {config} (no {compose_file})")
        project = yaml.safe_load(compose_file.read_text(encoding="utf-8"))["name"]
        compose_down(compose_file, project)
    except DockerError as err:
        raise err.within("kiban down --docker") from None
    console.print("down", highlight=False)
