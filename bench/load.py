"""Bounded load against a running sdxl-bento (loopback only): N clients for M seconds.

    .venv/bin/python bench/load.py --url http://127.0.0.1:3000 --clients 16 --seconds 60 [--api-key KEY]

Each client sends /generate requests back to back (random prompts, optional fixed size and steps)
and honours Retry-After on 429/503. It prints requests sent, outcomes by status, lost requests
(no HTTP answer at all: must be 0) and latency percentiles of the answered requests.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import statistics
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlparse

import httpx


def loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run(url: str, clients: int, seconds: float, body: dict, api_key: str | None, timeout: float) -> dict:
    stop_at = time.monotonic() + seconds
    lock = threading.Lock()
    statuses: Counter[int] = Counter()
    latencies: dict[int, list[float]] = {}
    lost: list[str] = []
    sent = 0
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def client(index: int) -> None:
        nonlocal sent
        rng = random.Random(index)
        with httpx.Client(base_url=url, timeout=timeout, headers=headers) as http:
            while time.monotonic() < stop_at:
                payload = {**body, "prompt": f"load test {index}-{rng.randrange(10**9)}"}
                started = time.monotonic()
                with lock:
                    sent += 1
                try:
                    r = http.post("/generate", json=payload)
                except httpx.HTTPError as exc:
                    with lock:
                        lost.append(f"{type(exc).__name__}: {exc}")
                    continue
                elapsed = time.monotonic() - started
                with lock:
                    statuses[r.status_code] += 1
                    latencies.setdefault(r.status_code, []).append(elapsed)
                if r.status_code in (429, 503):
                    time.sleep(min(float(r.headers.get("retry-after", 1)), max(0.0, stop_at - time.monotonic())))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = latencies.get(200, [])
    return {
        "clients": clients, "seconds": seconds, "requests": sent, "answered": sum(statuses.values()),
        "by_status": dict(sorted(statuses.items())), "lost": len(lost), "lost_examples": lost[:3],
        "images_per_s": round(len(ok) * body.get("num_images", 1) / seconds, 3),
        "latency_200_s": {"p50": round(percentile(ok, 50), 3), "p95": round(percentile(ok, 95), 3),
                          "p99": round(percentile(ok, 99), 3),
                          "mean": round(statistics.fmean(ok), 3) if ok else None},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--size", default="256x256")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--api-key")
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args(argv)
    if not loopback(args.url):
        print("bench/load.py sends traffic to loopback addresses only (127.0.0.0/8, ::1, localhost)", file=sys.stderr)
        return 2
    if not 1 <= args.clients <= 256 or not 0 < args.seconds <= 3600:
        print("--clients must be 1..256 and --seconds 0..3600", file=sys.stderr)
        return 2
    width, height = (int(v) for v in args.size.split("x"))
    result = run(args.url, args.clients, args.seconds, {"width": width, "height": height, "steps": args.steps},
                 args.api_key, args.timeout)
    print(json.dumps(result, indent=2))
    return 1 if result["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
