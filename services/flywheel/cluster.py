"""`flywheel up`: the whole cluster as local child processes — one embedded Redis and the four
services on the tiny model — with health waits and a clean stop that leaves no process behind.

Children run in their own sessions (so a terminal's Ctrl-C reaches only us and we stop them in
order: services, then Redis) and with PR_SET_PDEATHSIG, so a `kill -9` of `flywheel up` still
takes them down.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flywheel.common.auth import hash_key, new_secret
from flywheel.common.health import free_port, port_in_use, wait_serving
from flywheel.common.redis_store import EmbeddedRedis, _die_with_parent
from flywheel.services import SERVICES

STATE_FILE = "cluster.json"


class ClusterError(RuntimeError):
    """The local cluster could not start; the message says why and what to do."""


@dataclass
class ServiceProcess:
    name: str
    address: str
    metrics_port: int
    pid: int = 0
    log_file: str = ""


@dataclass
class ClusterState:
    data_dir: str
    redis_url: str
    internal_token: str
    api_key: str
    up_pid: int
    redis_pid: int = 0
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            json.dump(asdict(self), fh, indent=2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> ClusterState:
        data = json.loads(path.read_text())
        data["services"] = {k: ServiceProcess(**v) for k, v in data["services"].items()}
        return cls(**data)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _log_tail(path: str, chars: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class LocalCluster:
    def __init__(
        self,
        data_dir: Path,
        host: str = "127.0.0.1",
        base_port: int | None = None,
        services: tuple[str, ...] = tuple(SERVICES),
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.host = host
        self.base_port = base_port
        self.names = services
        self.extra_env = env or {}
        self.redis: EmbeddedRedis | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.state: ClusterState | None = None

    @property
    def state_path(self) -> Path:
        return self.data_dir / STATE_FILE

    def _ports(self) -> dict[str, tuple[int, int]]:
        ports = {}
        for i, name in enumerate(self.names):
            spec = SERVICES[name]
            if self.base_port == 0:
                ports[name] = (free_port(self.host), free_port(self.host))
            elif self.base_port is not None:
                ports[name] = (self.base_port + i, self.base_port + 100 + i)
            else:
                ports[name] = (spec.port, spec.metrics_port)
        for name, (port, metrics) in ports.items():
            for p in (port, metrics):
                if port_in_use(self.host, p):
                    raise ClusterError(
                        f"port {p} for {name} is in use: stop what holds it, or pass --base-port N (0 = any free)"
                    )
        return ports

    def start(self, timeout: float = 300.0) -> ClusterState:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.state_path.exists():
            old = ClusterState.load(self.state_path)
            if pid_alive(old.up_pid):
                raise ClusterError(
                    f"a cluster is already running from {self.data_dir} (pid {old.up_pid}): "
                    "stop it, or pass another --data-dir"
                )
        ports = self._ports()
        token, api_key = new_secret(), new_secret()
        keys_file = self.data_dir / "api_keys.txt"
        with open(os.open(keys_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            fh.write(f"# written by flywheel up\nlocal {hash_key(api_key)}\n")
        self.redis = EmbeddedRedis(self.data_dir / "redis").start()
        self.state = ClusterState(
            str(self.data_dir),
            self.redis.url,
            token,
            api_key,
            os.getpid(),
            redis_pid=self.redis.process.pid if self.redis.process else 0,
        )
        logs = self.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        address = {name: f"{self.host}:{port}" for name, (port, _) in ports.items()}
        env = {
            **os.environ,
            "FLYWHEEL_REDIS_URL": self.redis.url,
            "FLYWHEEL_INTERNAL_TOKEN": token,
            "FLYWHEEL_API_KEYS_FILE": str(keys_file),
            "FLYWHEEL_DATA_DIR": str(self.data_dir),
            "FLYWHEEL_HOST": self.host,
            "FLYWHEEL_LEARNER_CHECKPOINT_DIR": str(self.data_dir / "checkpoints"),
            "FLYWHEEL_LEARNER_RUN_DIR": str(self.data_dir / "runs" / time.strftime("%Y%m%d-%H%M%S")),
            "PYTHONUNBUFFERED": "1",
        }
        # Training prompts: production prompts from the generator's log, topped up by a built-in
        # set, so `flywheel learner resume` trains at once. Settings in our own env win.
        env.setdefault("FLYWHEEL_LEARNER_PROMPT_STREAM", "true")
        env.setdefault("FLYWHEEL_LEARNER_PROMPTS_FILE", "builtin://sentiment")
        if "generator" in address:
            env["FLYWHEEL_LEARNER_GENERATOR_TARGETS"] = address["generator"]
        if "reward" in address:
            env["FLYWHEEL_LEARNER_REWARD_TARGET"] = address["reward"]
        env.update(self.extra_env)
        try:
            for name, (port, metrics) in ports.items():
                child_env = {
                    **env,
                    f"FLYWHEEL_{name.upper()}_PORT": str(port),
                    f"FLYWHEEL_{name.upper()}_METRICS_PORT": str(metrics),
                }
                log_file = logs / f"{name}.log"
                with open(log_file, "ab") as out:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "flywheel.cli", "serve", name],
                        env=child_env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        preexec_fn=_die_with_parent,
                    )
                self.procs[name] = proc
                self.state.services[name] = ServiceProcess(
                    name, address[name], metrics, proc.pid, str(log_file)
                )
            self.state.save(self.state_path)
            deadline = time.monotonic() + timeout
            for name, svc in self.state.services.items():
                proc = self.procs[name]
                try:
                    wait_serving(
                        svc.address,
                        max(deadline - time.monotonic(), 0.1),
                        alive=lambda p=proc: p.poll() is None,
                    )  # type: ignore[misc]
                except (TimeoutError, RuntimeError) as exc:
                    raise ClusterError(
                        f"{name} did not become healthy: {exc}\n--- {svc.log_file} ---\n"
                        f"{_log_tail(svc.log_file)}"
                    ) from exc
        except BaseException:
            self.stop()
            raise
        return self.state

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every service (they drain), SIGKILL stragglers, then stop Redis. Idempotent."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if self.redis is not None:
            self.redis.close()
            self.redis = None
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()

    def wait(self) -> str | None:
        """Blocks until SIGINT/SIGTERM (returns None) or a child dies (returns its name)."""
        signals = {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            while True:
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        return name
                if (
                    self.redis is not None
                    and self.redis.process is not None
                    and self.redis.process.poll() is not None
                ):
                    return "redis"
                if signal.sigwait(signals) != signal.SIGCHLD:
                    return None
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
