"""The SDK imports and builds a client with only grpcio + protobuf: heavy and server-side packages
are made unimportable in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("torch", "transformers", "redis", "numpy", "yaml", "typer", "prometheus_client", "trl", "pandas")

SCRIPT = textwrap.dedent(
    f"""
    import sys

    BLOCKED = {BLOCKED!r}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked for this test: {{name}}")
            return None

    sys.meta_path.insert(0, Blocker())
    import flywheel_client
    from flywheel_client import ClientConfig, FlywheelClient, events

    client = FlywheelClient(ClientConfig(api_key="k", feedback_address="127.0.0.1:1"))
    event = events.rating("cid", thumb="up")
    assert event.idempotency_key and event.rating.completion_id == "cid"
    client.close()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("ok")
    """
)


def test_sdk_imports_without_server_dependencies() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
