"""``python -m frontend --http-port 8000 --host 127.0.0.1 [--namespace ...] [--etcd-endpoints ...]
[--nats-server ...] [--request-timeout ...]``: the OpenAI-compatible HTTP frontend."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from common.config import ClusterConfig, add_cluster_args
from frontend.app import FrontendConfig, create_app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = FrontendConfig(cluster=ClusterConfig())
    ap = argparse.ArgumentParser(prog="python -m frontend", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    ap.add_argument("--http-port", type=int, default=8000, help="HTTP port")
    ap.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s,
                    help="seconds a worker may take to answer one hop or to send the next token")
    ap.add_argument("--model-refresh", type=float, default=defaults.model_refresh_s,
                    help="seconds between re-reads of the model cards in etcd")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_cluster_args(ap, ClusterConfig.from_env())
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = FrontendConfig(cluster=ClusterConfig.from_args(args), request_timeout_s=args.request_timeout,
                                model_refresh_s=args.model_refresh)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    uvicorn.run(create_app(config), host=args.host, port=args.http_port, log_level=args.log_level,
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
