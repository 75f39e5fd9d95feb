"""Readiness probes for deploy/slurm/triad_srun.sh (standard library only, so any python works).

    python wait_ready.py tcp HOST PORT --timeout 30
    python wait_ready.py http URL --timeout 30                 # any 2xx
    python wait_ready.py workers URL --expect encode=1,prefill=2,decode=1 --timeout 600
    python wait_ready.py model BASE_URL                        # print the first served model id

`workers` polls the frontend's /health until it lists at least the expected number of instances
per role. It does not depend on one exact JSON shape: it sums, wherever a key named after a role
appears, the count under it (a number, the length of a list, or the sum over a dict of those).
Exit status 0 when ready, 1 on timeout (the last state seen is printed).
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.error
import urllib.request

ROLES = ("agg", "encode", "prefill", "decode")


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def http_json(url: str) -> tuple[int, object]:
    """Status and parsed body (None when not JSON); status 0 when unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=2.0) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:  # /health answers 503 until a model is servable
        status, body = e.code, e.read()
    except (OSError, ValueError):
        return 0, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def _count(value: object) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, list):
        return len(value)
    if isinstance(value, dict):
        return sum(_count(v) for v in value.values())
    return 0


def role_counts(doc: object) -> dict[str, int]:
    """Instances per role found anywhere in a /health document."""
    counts = dict.fromkeys(ROLES, 0)
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in counts:
                    counts[key] += _count(value)
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    return counts


def parse_expect(text: str) -> dict[str, int]:
    expect = {}
    for item in filter(None, text.split(",")):
        role, _, n = item.partition("=")
        if role not in ROLES or not n.isdigit():
            raise SystemExit(f"--expect item {item!r} must look like ROLE=N with ROLE in {ROLES}")
        expect[role] = int(n)
    return expect


def poll(check, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return False


def print_model(base_url: str) -> int:
    """Print the id of the first model /v1/models lists (for the curl example)."""
    _, doc = http_json(base_url.rstrip("/") + "/v1/models")
    data = doc.get("data") if isinstance(doc, dict) else None
    if not data:
        return 1
    print(data[0].get("id", ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=("tcp", "http", "workers", "model"))
    p.add_argument("target", nargs="+", help="HOST PORT for tcp, URL otherwise")
    p.add_argument("--expect", default="", help="ROLE=N,... for `workers`")
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args(argv)
    last: dict[str, object] = {}
    if a.kind == "model":
        return print_model(a.target[0])
    if a.kind == "tcp":
        ok = poll(lambda: tcp_open(a.target[0], int(a.target[1])), a.timeout)
    elif a.kind == "http":
        ok = poll(lambda: 200 <= http_json(a.target[0])[0] < 300, a.timeout)
    else:
        expect = parse_expect(a.expect)

        def workers_ready() -> bool:
            status, doc = http_json(a.target[0])
            last["status"], last["counts"] = status, role_counts(doc)
            return status != 0 and all(last["counts"][r] >= n for r, n in expect.items())

        ok = poll(workers_ready, a.timeout, interval=1.0)
    if not ok:
        print(f"not ready after {a.timeout:.0f}s: {a.kind} {' '.join(a.target)} {last}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
