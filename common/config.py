"""Cluster-wide configuration shared by every process (frontend and workers).

Frozen dataclasses that check themselves on construction, so a bad value fails at start-up with a
message that says what to fix. Entry points build them with argparse (``add_cluster_args`` /
``ClusterConfig.from_args``) or from the environment (``ClusterConfig.from_env``).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from urllib.parse import urlparse

# The namespace is both an etcd key prefix and a NATS subject token: no dots, spaces or wildcards.
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_-]+$")

_ENV_VARS = {
    "namespace": "TRIAD_NAMESPACE",
    "etcd_endpoints": "ETCD_ENDPOINTS",
    "nats_server": "NATS_SERVER",
    "lease_ttl_s": "TRIAD_LEASE_TTL",
    "advertise_host": "TRIAD_ADVERTISE_HOST",
}


def _check_urls(value: str, schemes: tuple[str, ...], what: str) -> None:
    """Every comma-separated entry must be ``scheme://host:port`` with an allowed scheme."""
    entries = [e.strip() for e in value.split(",") if e.strip()]
    if not entries:
        raise ValueError(f"{what} is empty; give e.g. {schemes[0]}://127.0.0.1:PORT")
    for entry in entries:
        url = urlparse(entry)
        if url.scheme not in schemes or not url.hostname or url.port is None:
            raise ValueError(
                f"{what} entry {entry!r} is not a URL like {schemes[0]}://HOST:PORT "
                f"(allowed schemes: {', '.join(schemes)})"
            )


@dataclass(frozen=True)
class ClusterConfig:
    """Where the control planes are and how this process shows itself to the cluster."""

    namespace: str = "triad"
    etcd_endpoints: str = "http://127.0.0.1:2379"  # comma-separated
    nats_server: str = "nats://127.0.0.1:4222"  # comma-separated
    lease_ttl_s: float = 10.0
    advertise_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not _NAMESPACE_RE.match(self.namespace):
            raise ValueError(
                f"namespace {self.namespace!r} may only hold letters, digits, '-' and '_' "
                "(it is used as an etcd prefix and a NATS subject token)"
            )
        _check_urls(self.etcd_endpoints, ("http", "https"), "etcd_endpoints")
        _check_urls(self.nats_server, ("nats", "tls"), "nats_server")
        # etcd rounds leases up to whole seconds and will not keep one shorter than ~2 s.
        if not 2.0 <= self.lease_ttl_s <= 3600.0:
            raise ValueError(f"lease_ttl_s must be between 2 and 3600 seconds, got {self.lease_ttl_s}")
        if not self.advertise_host or any(c.isspace() for c in self.advertise_host):
            raise ValueError(f"advertise_host {self.advertise_host!r} must be a host name or IP address")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClusterConfig:
        """Defaults, overridden by TRIAD_NAMESPACE, ETCD_ENDPOINTS, NATS_SERVER, TRIAD_LEASE_TTL,
        TRIAD_ADVERTISE_HOST where set."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for name, var in _ENV_VARS.items():
            if env.get(var):
                values[name] = env[var]
        if "lease_ttl_s" in values:
            try:
                values["lease_ttl_s"] = float(str(values["lease_ttl_s"]))
            except ValueError:
                raise ValueError(f"TRIAD_LEASE_TTL={values['lease_ttl_s']!r} is not a number") from None
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClusterConfig:
        """Build from a namespace filled by a parser that ``add_cluster_args`` extended."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def add_cluster_args(parser: argparse.ArgumentParser, defaults: ClusterConfig | None = None) -> None:
    """Add --namespace, --etcd-endpoints, --nats-server, --lease-ttl-s, --advertise-host.

    Defaults come from ``defaults`` (normally ``ClusterConfig.from_env()``), so the environment
    sets them and the command line overrides.
    """
    d = defaults or ClusterConfig.from_env()
    group = parser.add_argument_group("cluster")
    group.add_argument("--namespace", default=d.namespace, help="etcd prefix and NATS subject root")
    group.add_argument("--etcd-endpoints", default=d.etcd_endpoints, help="comma-separated etcd URLs")
    group.add_argument("--nats-server", default=d.nats_server, help="comma-separated NATS URLs")
    group.add_argument("--lease-ttl-s", type=float, default=d.lease_ttl_s, help="discovery lease TTL")
    group.add_argument("--advertise-host", default=d.advertise_host, help="address peers reach us at")
