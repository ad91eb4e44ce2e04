"""The supervisor behind `kiban up`: start engines and the gateway, watch, restart, stop.

Phases: :meth:`Supervisor.prepare` builds or reuses each engine's environment
and runs the GPU fail-fast checks (nothing has started yet); :meth:`start`
launches every engine and waits until each answers its health endpoint, then
starts the gateway; :meth:`watch` restarts what crashes, with exponential
backoff and a restart limit, until :meth:`shutdown`. Processes are tracked by
PID and start time in the run directory's state.json, so another supervisor
(the daemon of ``kiban up --detach``) can adopt them, and `kiban status` and
`kiban down` work from any shell.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from urllib.parse import urlsplit

from kiban.config import EngineConfig, KibanConfig, RestartPolicy
from kiban.deploy import gpu_policy
from kiban.deploy.envs import EnvInstallError
from kiban.deploy.launch import EngineCommand, engine_command, engine_env_root
from kiban.engines import ENGINE_KINDS
from kiban.errors import KibanError
from kiban.planning.plan import plan_config
from kiban.processes import ProcessId, group_members, spawn, stop_group, tail
from kiban.run_state import RUN_STATE_ENV, ProcessRecord, RunDir, RunState
from kiban.sizing.plan import Plan

Say = Callable[[str], None]
GATEWAY = "gateway"
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "0.0.0.0", "::1", "::")
_GATEWAY_READY_S = 60.0
_GATEWAY_GRACE_EXTRA_S = 5.0  # beyond the gateway's own gateway.shutdown_grace_s


class SupervisorError(KibanError):
    """`kiban up` cannot go on; ``problems`` say why, each on its own line."""

    exit_code = 1
    headline = "kiban up failed:"

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class _Managed:
    """One supervised process: its record on disk and what it takes to (re)start it."""

    record: ProcessRecord
    command: EngineCommand
    policy: RestartPolicy
    grace_s: float
    ready_timeout_s: float
    engine: EngineConfig | None = None  # None for the gateway
    child: Popen[bytes] | None = None
    ready_deadline: float = 0.0
    next_restart_at: float | None = None
    failures: int = 0
    last_failure: str = ""


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """One GET answered 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status: int = resp.status
            return status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


class Supervisor:
    """Runs the managed engines and the gateway of one configuration."""

    def __init__(self, cfg: KibanConfig, config_path: Path, say: Say = print) -> None:
        self.cfg = cfg
        self.config_path = config_path.resolve()
        self.run_dir = RunDir(self.config_path)
        self.say = say
        self.state = RunState(config=str(self.config_path))
        self.managed: dict[str, _Managed] = {}
        self.stopping = False
        self.plan: Plan | None = None

    @property
    def engines(self) -> list[EngineConfig]:
        return [e for e in self.cfg.engines if e.launch is not None]

    # -- before anything starts ---------------------------------------------------------------

    def prepare(self, progress: Say | None = None, *, adopting: bool = False) -> None:
        """Environments, launch commands and GPU checks; raises SupervisorError, starts nothing.

        *adopting*: the processes already run (a daemon taking over): skip the checks
        that only make sense before a start (GPU memory, busy ports).
        """
        problems: list[str] = []
        for engine in self.engines:
            host = urlsplit(engine.url).hostname or ""
            if host not in _LOCAL_HOSTS:
                problems.append(
                    f"engine {engine.name!r}: kiban up runs engines on this machine, so its url "
                    f"must name 127.0.0.1, localhost or 0.0.0.0 (got {engine.url!r}); engines "
                    "on other hosts are for kiban compose / render k8s, or drop the launch section"
                )
                continue
            assert engine.launch is not None  # self.engines are the launched ones
            try:
                ENGINE_KINDS[engine.kind].launch().environment(engine.launch.device)
            except Exception as err:  # LaunchUnsupported: say it for every engine at once
                problems.append(f"engine {engine.name!r}: {err}")
        gpus_checked = not adopting and gpu_policy.gpu_required(self.cfg)
        if not problems and gpus_checked:
            problems += gpu_policy.preflight(self.cfg, self.engines)  # driver, GPUs exist
        plan = plan_config(self.cfg) if not problems else None
        if plan is not None:
            problems += plan.problems
            if not adopting:
                for warning in plan.warnings:
                    self.say(f"plan: {warning}")
        if not problems and gpus_checked:
            problems += gpu_policy.preflight(self.cfg, self.engines, _gpu_need(plan))  # memory
        if not problems and not adopting:
            problems += self._busy_ports()
        if problems:
            raise SupervisorError(problems)
        assert plan is not None
        for engine in self.engines:
            try:
                root = engine_env_root(engine, progress)
            except EnvInstallError as err:
                raise SupervisorError(
                    [f"engine {engine.name!r}: building its environment failed: {err}"]
                ) from None
            ep = plan.engine(engine.name)  # None: nothing to plan (kind openai's own command)
            flags, env = (ep.flags, ep.env) if ep is not None else ([], {})
            self._manage_engine(engine, engine_command(engine, root, flags, env))
        self._manage_gateway()
        self.plan = plan

    def _busy_ports(self) -> list[str]:
        problems = []
        for engine in self.engines:
            if http_ok(engine.url + ENGINE_KINDS[engine.kind].dialect.health_path, timeout=0.5):
                problems.append(
                    f"engine {engine.name!r}: something already answers at {engine.url}; "
                    "stop it or give this engine another launch.port"
                )
        gw = self.cfg.gateway
        if http_ok(f"http://{_connect_host(gw.host)}:{gw.port}/health", timeout=0.5):
            problems.append(f"gateway: port {gw.port} is already serving; stop it or change it")
        return problems

    def _manage_engine(self, engine: EngineConfig, command: EngineCommand) -> None:
        assert engine.launch is not None
        record = ProcessRecord(
            name=engine.name,
            url=engine.url,
            log=str(self.run_dir.log_path(engine.name)),
            kind=engine.kind,
            model=engine.launch.model,
            device=engine.launch.device,
            gpus=list(engine.launch.gpus) if engine.launch.device == "gpu" else [],
        )
        self.managed[engine.name] = _Managed(
            record=record,
            command=command,
            policy=engine.launch.restart,
            grace_s=engine.launch.stop_grace_s,
            ready_timeout_s=engine.launch.ready_timeout_s,
            engine=engine,
        )
        self.state.engines[engine.name] = record

    def _manage_gateway(self) -> None:
        gw = self.cfg.gateway
        url = f"http://{_connect_host(gw.host)}:{gw.port}"
        argv = [sys.executable, "-m", "kiban.cli", "serve", "-c", str(self.config_path)]
        command = EngineCommand(
            name=GATEWAY,
            argv=argv,
            env=os.environ | {RUN_STATE_ENV: str(self.run_dir.state_file)},
            url=url,
            health_url=url + "/health",
        )
        record = ProcessRecord(name=GATEWAY, url=url, log=str(self.run_dir.log_path(GATEWAY)))
        self.managed[GATEWAY] = _Managed(
            record=record,
            command=command,
            policy=RestartPolicy(),
            grace_s=gw.shutdown_grace_s + _GATEWAY_GRACE_EXTRA_S,
            ready_timeout_s=_GATEWAY_READY_S,
        )
        self.state.gateway = record

    # -- start ----------------------------------------------------------------------------------

    def lock(self) -> None:
        """Become the one supervisor of this configuration, or raise."""
        if not self.run_dir.try_lock():
            previous = self.run_dir.read()
            pid = previous.supervisor_pid if previous else "?"
            raise SupervisorError(
                [
                    f"kiban is already up for {self.config_path} (supervisor PID {pid}); "
                    "run `kiban down` first"
                ]
            )
        ident = ProcessId.of(os.getpid())
        assert ident is not None
        self.state.supervisor_pid, self.state.supervisor_start_ticks = ident.pid, ident.start_ticks

    def start(self, tick: Callable[[dict[str, str]], None] | None = None) -> None:
        """Launch every engine, wait until all are healthy, then start the gateway.

        *tick* receives each process's state about once a second (for a progress
        display). If an engine fails to start, everything started is stopped and
        SupervisorError carries the reason and the end of the engine's log.
        """
        failed: list[str] = []
        for wave in self._waves():
            for m in wave:
                self._spawn(m)
            self._save()
            failed = self._wait_ready(wave, tick)
            if failed:
                break
        if not failed:
            gateway = self.managed[GATEWAY]
            self._spawn(gateway)
            failed = self._wait_ready([gateway], tick)
        if failed:
            self.shutdown()
            raise SupervisorError(failed)

    def _waves(self) -> list[list[_Managed]]:
        """Start order: an engine waits for the earlier engines on any of its GPUs.

        Engines that size their cache from the memory free when they start
        (lmdeploy, SGLang; vLLM checks free memory too) must not race for a
        shared GPU; engines on other GPUs or on the CPU start together.
        """
        waves: list[list[_Managed]] = []
        wave_of_gpu: dict[int, int] = {}
        for name, m in self.managed.items():
            if name == GATEWAY:
                continue
            gpus = m.record.gpus
            wave = max((wave_of_gpu[g] + 1 for g in gpus if g in wave_of_gpu), default=0)
            for g in gpus:
                wave_of_gpu[g] = wave
            while len(waves) <= wave:
                waves.append([])
            waves[wave].append(m)
        return waves

    def _spawn(self, m: _Managed) -> None:
        rec = m.record
        m.child = spawn(m.command.argv, m.command.env, Path(rec.log))
        ident = ProcessId.of(m.child.pid)
        rec.pid = m.child.pid
        rec.start_ticks = ident.start_ticks if ident else None
        rec.started_at = time.time()
        rec.state = "starting"
        rec.gpu_verified = None
        m.ready_deadline = time.monotonic() + m.ready_timeout_s
        m.next_restart_at = None

    def _wait_ready(
        self, group: list[_Managed], tick: Callable[[dict[str, str]], None] | None
    ) -> list[str]:
        pending = {m.record.name: m for m in group}
        failed: list[str] = []
        while pending:
            for name, m in list(pending.items()):
                problem = self._check_starting(m)
                if m.record.state != "starting":
                    del pending[name]
                    if problem:
                        failed.append(problem)
            if tick:
                tick({m.record.name: m.record.state for m in group})
            if pending:
                time.sleep(1.0)
        self._save()
        return failed

    def _check_starting(self, m: _Managed) -> str | None:
        """Advance a starting process: running when healthy, failed when dead or late."""
        rec = m.record
        if not self._alive(m):
            rec.state = "failed"
            rec.message = f"exited{self._exit_code(m)} before it was healthy"
            return self._failure_text(m)
        if http_ok(m.command.health_url):
            rec.state = "running"
            return self._verify_gpu(m)
        if time.monotonic() > m.ready_deadline:
            self._stop(m)
            rec.state = "failed"
            rec.message = f"not healthy after {m.ready_timeout_s:g} s"
            return self._failure_text(m)
        return None

    def _failure_text(self, m: _Managed) -> str:
        rec = m.record
        lines = [f"{rec.name}: {rec.message} (log: {rec.log})"]
        if m.engine is not None:
            report = ENGINE_KINDS[m.engine.kind].startup_log.report(tail(Path(rec.log), 400))
            lines += [f"  reason: {err}" for err in report.errors]
        excerpt = tail(Path(rec.log), 25)
        if excerpt:
            lines.append("  --- end of log ---")
            lines += [f"  {line}" for line in excerpt.splitlines()]
        return "\n".join(lines)

    def _verify_gpu(self, m: _Managed) -> str | None:
        engine, rec = m.engine, m.record
        if engine is None or engine.launch is None or engine.launch.device != "gpu":
            return None
        report = ENGINE_KINDS[engine.kind].startup_log.report(tail(Path(rec.log), 2000))
        assert rec.pid is not None
        verdict = gpu_policy.verify_on_gpu(engine, group_members(rec.pid), report)
        rec.gpu_verified = verdict.on_gpu
        if verdict.on_gpu is False and gpu_policy.gpu_required(self.cfg):
            self._stop(m)
            rec.state = "failed"
            rec.message = f"not on its GPU: {verdict.detail}; stopped (gpu.require is on)"
            return f"{rec.name}: {rec.message}"
        rec.message = verdict.detail
        return None

    # -- watch ----------------------------------------------------------------------------------

    def watch(self, poll_s: float = 1.0) -> None:
        """Restart what dies until :attr:`stopping` is set (by a signal handler)."""
        while not self.stopping:
            changed = False
            for m in self.managed.values():
                changed |= self._step(m)
            if changed:
                self._save()
            time.sleep(poll_s)

    def _step(self, m: _Managed) -> bool:
        rec = m.record
        now = time.monotonic()
        if rec.state == "running" and not self._alive(m):
            self._on_crash(m, f"exited{self._exit_code(m)}")
            return True
        if rec.state == "starting":
            before = rec.state
            self._check_starting(m)
            after: str = m.record.state  # _check_starting moves it on
            if after == "failed" and rec.gpu_verified is not False:
                self._on_crash(m, rec.message)  # died or never got healthy: try again
            if m.record.state == "running":
                self.say(f"{rec.name} is healthy again (restart {rec.restarts})")
            return rec.state != before
        if rec.state == "restarting" and m.next_restart_at is not None and now >= m.next_restart_at:
            rec.restarts += 1
            self._spawn(m)
            rec.message = f"restart {rec.restarts} after: {m.last_failure}"
            self.say(f"{rec.name}: restarted (restart {rec.restarts}, PID {rec.pid})")
            return True
        return False

    def _on_crash(self, m: _Managed, what: str) -> None:
        rec = m.record
        self._stop(m)  # whatever the crashed leader left behind (workers holding the port)
        if rec.started_at is not None and time.time() - rec.started_at >= m.policy.reset_after_s:
            m.failures = 0
        m.failures += 1
        if m.failures > m.policy.max_restarts:
            rec.state = "failed"
            rec.message = f"{what}; gave up after {m.policy.max_restarts} restarts"
            self.say(f"{rec.name}: {rec.message} (log: {rec.log})")
            return
        delay = min(m.policy.backoff_s * 2 ** (m.failures - 1), m.policy.backoff_max_s)
        m.last_failure = what
        rec.state = "restarting"
        rec.message = f"{what}; restarting in {delay:g} s"
        m.next_restart_at = time.monotonic() + delay
        self.say(f"{rec.name}: {rec.message}")

    # -- adopt (kiban up --detach hands over to a daemon) ---------------------------------------

    def adopt(self, previous: RunState) -> None:
        """Take over the processes a previous supervisor of this configuration started."""
        for name, m in self.managed.items():
            old = previous.gateway if name == GATEWAY else previous.engines.get(name)
            if old is None:
                continue
            m.record = old
            if name == GATEWAY:
                self.state.gateway = old
            else:
                self.state.engines[name] = old
            m.ready_deadline = time.monotonic() + m.ready_timeout_s
            if old.state == "restarting":
                m.next_restart_at = time.monotonic()
        self._save()

    # -- stop -----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the gateway first (no new requests), then every engine in parallel."""
        self.stopping = True
        gateway = self.managed.get(GATEWAY)
        if gateway is not None:
            self._stop(gateway)
            gateway.record.state = "stopped"
        engines = [m for name, m in self.managed.items() if name != GATEWAY]
        with ThreadPoolExecutor(max_workers=max(1, len(engines))) as pool:
            list(pool.map(self._stop, engines))
        for m in engines:
            m.record.state = "stopped"
        self.state.supervisor_pid = self.state.supervisor_start_ticks = None
        self._save()
        self.run_dir.unlock()

    def _stop(self, m: _Managed) -> None:
        ident = m.record.ident
        if ident is not None:
            stop_group(ident, m.grace_s, m.child)

    # -- helpers --------------------------------------------------------------------------------

    def _alive(self, m: _Managed) -> bool:
        if m.child is not None:
            return m.child.poll() is None
        ident = m.record.ident
        return ident is not None and ident.alive()

    @staticmethod
    def _exit_code(m: _Managed) -> str:
        """`` with code N`` where known (a daemon cannot see an adopted process's code)."""
        if m.child is not None and m.child.returncode is not None:
            return f" with code {m.child.returncode}"
        return ""

    def _save(self) -> None:
        self.run_dir.write(self.state)


def _gpu_need(plan: Plan | None) -> dict[int, int] | None:
    """Bytes the plan gives the engines on each GPU index (what must be free at start)."""
    if plan is None:
        return None
    need: dict[int, int] = {}
    for device in plan.devices:
        if device.key.startswith("gpu") and device.shares:
            need[int(device.key.removeprefix("gpu"))] = sum(device.shares.values())
    return need


def _connect_host(host: str) -> str:
    """Where to reach a server that listens on *host* (wildcards mean loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
