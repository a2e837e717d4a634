"""Generator replica addresses: a list of host:port, or one dns:///NAME:PORT meaning every address
the name resolves to (a Kubernetes headless service), resolved again on every call so replicas that
come and go are followed."""

from __future__ import annotations

import socket
from collections.abc import Sequence

DNS_SCHEME = "dns:///"


def resolve_targets(targets: Sequence[str]) -> list[str]:
    """host:port strings of every replica, in a stable order; raises OSError if a name resolves to none."""
    resolved: list[str] = []
    for target in targets:
        if not target.startswith(DNS_SCHEME):
            resolved.append(target)
            continue
        host, sep, port = target[len(DNS_SCHEME):].rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"generator target {target!r}: write dns:///NAME:PORT")
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        addresses = sorted({info[4][0] for info in infos})
        if not addresses:
            raise OSError(f"{host} resolves to no address")
        resolved += [f"[{a}]:{port}" if ":" in str(a) else f"{a}:{port}" for a in addresses]
    return list(dict.fromkeys(resolved))
