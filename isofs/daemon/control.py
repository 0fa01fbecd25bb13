"""Introspection of a live mount: a unix socket served by the daemon, and its client.

Protocol: the client sends one JSON line `{"cmd": "status"}`; the daemon answers one JSON
document and closes. The socket lives in the owner-only runtime directory and is mode 0600.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import trio

log = logging.getLogger(__name__)


Command = Callable[[], Awaitable[dict[str, Any]]]


async def serve_control(
    path: str,
    status: Callable[[], dict[str, Any]],
    commands: dict[str, Command] | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer requests until cancelled: "status", and the daemon's other `commands`.

    `task_status.started()` once the socket listens (a mount reported as mounted answers).
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(8)
    task_status.started()
    try:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(_answer, conn, status, commands or {})
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def _answer(
    conn: trio.socket.SocketType, status: Callable[[], dict[str, Any]], commands: dict[str, Command]
) -> None:
    """One request; whatever goes wrong is logged and never reaches the mount's nursery."""
    stream = trio.SocketStream(conn)
    try:
        with trio.fail_after(90):
            request = await stream.receive_some(4096)
            command = json.loads(request or b"{}").get("cmd")
            if command == "status":
                reply = status()
            elif command in commands:
                reply = await commands[command]()
            else:
                reply = {"error": f"unknown {command!r}"}
            await stream.send_all(json.dumps(reply, default=_jsonable).encode())
    except Exception as exc:
        log.warning("control request failed: %s", exc)
    finally:
        await stream.aclose()


def _jsonable(value: object) -> object:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)  # type: ignore[arg-type]
    return str(value)


def request_status(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask a daemon for its status (raises OSError when it does not answer)."""
    return request(path, "status", timeout)


def request(path: str, command: str, timeout: float = 5.0) -> dict[str, Any]:
    """Send one command to a daemon and return its answer (OSError when it does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({"cmd": command}).encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def format_status(status: dict[str, Any]) -> str:
    """The human-readable `isofs status` report."""
    cache = status["page_cache"]
    sizes = status["size_cache"]
    callers = status.get("callers") or {}
    lines = [
        f"isofs {status['source']} on {status['mountpoint']} "
        f"(pid {status['pid']}, up {status['uptime_s']} s, log {status['log']})",
        f"stack: {' -> '.join(status['stack']) or 'none (passthrough)'}",
        f"views: {', '.join(status['views'])}"
        + (f" (single view: {status['single_view']})" if status["single_view"] else ""),
        "rules:",
        *(f"  {line}" for line in status["policy"]),
        "requests per view: "
        + (", ".join(f"{v} {n}" for v, n in status["requests_per_view"].items()) or "-"),
    ]
    for view, seen in (status.get("callers_per_view") or {}).items():
        top = sorted(seen.items(), key=lambda item: -item[1])[:8]
        if top:
            lines.append(f"callers seen ({view}): " + ", ".join(f"{e} {n}" for e, n in top))
    if callers:
        lines.append(
            f"caller resolution: {callers.get('hits', 0)} hits, {callers.get('misses', 0)} "
            f"misses, {callers.get('entries', 0)} cached"
        )
    lines += [
        f"inodes {status['inodes']}, open files {status['open_files']}, "
        f"sections {len(status['sections'])}, kernel invalidations {status['invalidations']}",
        f"page cache: {cache['bytes_cached'] >> 20} MiB of {cache['budget'] >> 20} MiB, "
        f"{cache['dirty_bytes'] >> 10} KiB dirty, hit ratio {cache['hit_ratio']:.1%} "
        f"({cache['hits']} hits, {cache['misses']} misses, {cache['evictions']} evictions)",
        "size cache: " + ", ".join(f"{k} {v}" for k, v in sizes.items()),
    ]
    for layer in status.get("layers", []):
        figures = {k: v for k, v in layer.items() if k != "layer"}
        if figures:
            lines.append(f"{layer['layer']}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    for section in status["sections"][:20]:
        lines.append(
            f"  section {section['file']} ({section['view']} view): size {section['size']}, "
            f"handles {section['handles']}{', dirty' if section['dirty'] else ''}"
        )
    lines.append("requests:")
    for name, op in status["operations"].items():
        lines.append(
            f"  {name:12} {op['count']:>9}  mean {op['mean_us']:>8.1f} us  "
            f"max {op['max_us']:>10.1f} us  errors {op['errors']}"
        )
    lines.append("slowest:")
    for op in status["slowest"]:
        lines.append(f"  {op['us']:>10.1f} us  {op['op']} {op['args']}")
    return "\n".join(lines)
