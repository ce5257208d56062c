"""Load test for `fmnist serve`: N concurrent clients POST one image for T seconds; requests/s and latency.

    python scripts/serve_load.py --port 8000 --clients 32 --seconds 15 --image tests/data/ankle_boot.png

Each client keeps one HTTP/1.1 connection open and sends the image as a raw image/png (or JPEG) body,
then waits for the answer before sending the next one (closed loop). Every answer must be 200 with
the class the first answer gave (or --expect); anything else counts as an error or a wrong answer.
Prints one JSON object: requests, errors, wrong, requests/s, p50/p95/p99 latency in ms.

Traffic goes to 127.0.0.1 only: any other host is refused before a byte is sent. The run is bounded:
it stops after --seconds or --max-requests, whichever comes first, and each request times out.
Standard library only, so the client costs as little CPU as a Python client can (it shares the
machine with the server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ALLOWED_HOST = "127.0.0.1"
MAX_CLIENTS = 256
MAX_SECONDS = 600
REQUEST_TIMEOUT_S = 30.0


def local_target(url: str) -> tuple[str, int, str]:
    """(host, port, path) of a URL on 127.0.0.1; anything else is refused (SystemExit)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname != ALLOWED_HOST:
        raise SystemExit(f"serve_load: refusing {url!r}: load is only ever sent to http://{ALLOWED_HOST}")
    return ALLOWED_HOST, parts.port or 80, parts.path or "/predict"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank: the ceil(q/100 * N)-th smallest; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q * len(ordered) / 100)))
    return ordered[rank - 1]


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, await reader.readexactly(length)


async def _client(
    host: str, port: int, request: bytes, deadline: float, budget: list[int], results: dict[str, list]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            start = time.perf_counter()
            try:
                writer.write(request)
                status, body = await asyncio.wait_for(_read_response(reader), REQUEST_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                results["errors"].append(f"{type(exc).__name__}: {exc}")
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            elapsed = time.perf_counter() - start
            if status != 200:
                results["errors"].append(f"HTTP {status}: {body[:200]!r}")
                continue
            results["latencies"].append(elapsed)
            results["classes"].append(json.loads(body)["class_index"])
    finally:
        writer.close()


async def run_load(
    url: str, image: bytes, content_type: str, clients: int, seconds: float, max_requests: int, api_key: str | None
) -> dict:
    host, port, path = local_target(url)
    headers = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(image)}",
        *([f"X-API-Key: {api_key}"] if api_key else []),
    ]
    request = ("\r\n".join(headers) + "\r\n\r\n").encode() + image
    results: dict[str, list] = {"latencies": [], "classes": [], "errors": []}
    budget = [max_requests]
    start = time.monotonic()
    deadline = start + seconds
    await asyncio.gather(*(_client(host, port, request, deadline, budget, results) for _ in range(clients)))
    wall = time.monotonic() - start
    latencies_ms = [1000 * s for s in results["latencies"]]
    classes = results["classes"]
    return {
        "clients": clients,
        "seconds": round(wall, 2),
        "requests": len(classes) + len(results["errors"]),
        "ok": len(classes),
        "errors": len(results["errors"]),
        "error_examples": sorted(set(results["errors"]))[:5],
        "classes": classes,  # every answer's class, for the wrong-answer count
        "requests_per_s": round(len(classes) / wall, 1) if wall > 0 else 0.0,
        "p50_ms": round(percentile(latencies_ms, 50), 1),
        "p95_ms": round(percentile(latencies_ms, 95), 1),
        "p99_ms": round(percentile(latencies_ms, 99), 1),
        "mean_ms": round(statistics.fmean(latencies_ms), 1) if latencies_ms else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="http://127.0.0.1:PORT/predict (only 127.0.0.1 is allowed)")
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 when --url is not given")
    parser.add_argument("--clients", type=int, default=8, help=f"concurrent clients (1-{MAX_CLIENTS})")
    parser.add_argument("--seconds", type=float, default=10.0, help=f"how long to send (at most {MAX_SECONDS})")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    parser.add_argument("--image", type=Path, default=Path(__file__).parents[1] / "tests" / "data" / "ankle_boot.png")
    parser.add_argument("--expect", type=int, default=None, help="the class index every answer must have")
    parser.add_argument("--api-key", default=None, help="sent as X-API-Key")
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    url = args.url or f"http://{ALLOWED_HOST}:{args.port}/predict"
    local_target(url)
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.seconds <= MAX_SECONDS or args.max_requests < 1:
        parser.error(f"--clients 1-{MAX_CLIENTS}, --seconds in (0, {MAX_SECONDS}], --max-requests >= 1")
    image = args.image.read_bytes()
    content_type = "image/jpeg" if args.image.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    result = asyncio.run(
        run_load(url, image, content_type, args.clients, args.seconds, args.max_requests, args.api_key)
    )
    expected = args.expect if args.expect is not None else (result["classes"][0] if result["classes"] else None)
    result["wrong"] = sum(1 for c in result.pop("classes") if c != expected) if expected is not None else 0
    result["expected_class"] = expected
    text = json.dumps(result)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if result["errors"] or result["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
