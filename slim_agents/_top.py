# `slim-agents top`: a live view of a node — links, apps, channels with their
# members, message rates and drops per connection. Uses rich (the `top` extra)
# on a terminal; prints plain text blocks when stdout is not a terminal.
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import anyio

__all__ = ["Snapshot", "render_text", "snapshot_from_report"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One look at a node (what :func:`node_lite.Node.report` returns, parsed)."""

    at: float
    node: str
    endpoints: list[str]
    totals: Mapping[str, int]
    links: list[Mapping[str, Any]]
    connections: list[Mapping[str, Any]]
    channels: Mapping[str, list[str]]
    drops: Mapping[str, int] = field(default_factory=dict)


def snapshot_from_report(report: Mapping[str, Any], at: float | None = None) -> Snapshot:
    return Snapshot(at=time.monotonic() if at is None else at, node=str(report.get("node")),
                    endpoints=list(report.get("endpoints", [])),
                    totals=dict(report.get("totals", {})), links=list(report.get("links", [])),
                    connections=list(report.get("connections", [])),
                    channels={str(k): list(v) for k, v in report.get("channels", {}).items()},
                    drops=dict(report.get("drops", {})))


def _rates(now: Snapshot, before: Snapshot | None) -> dict[int, tuple[float, float]]:
    """Frames/s in and out per connection id since the previous snapshot."""
    if before is None:
        return {}
    dt = max(now.at - before.at, 1e-6)
    old = {c["id"]: c for c in before.connections}
    out = {}
    for c in now.connections:
        prev = old.get(c["id"])
        if prev is not None:
            out[c["id"]] = ((c["frames_in"] - prev["frames_in"]) / dt,
                            (c["frames_out"] - prev["frames_out"]) / dt)
    return out


def _rows(now: Snapshot, before: Snapshot | None) -> list[list[str]]:
    rates = _rates(now, before)
    rows = []
    for c in sorted(now.connections, key=lambda c: (c["kind"], str(c.get("name")))):
        rin, rout = rates.get(c["id"], (0.0, 0.0))
        drops = ", ".join(f"{k} {v}" for k, v in sorted(c.get("drops", {}).items())) or "-"
        rows.append([c["kind"], str(c.get("name") or c.get("peer") or "-"),
                     f"{rin:,.0f}", f"{rout:,.0f}", str(c.get("pending_frames", 0)), drops])
    return rows


def render_text(now: Snapshot, before: Snapshot | None = None) -> str:
    """The view as plain text (what a non-terminal gets, one block per refresh)."""
    t = now.totals
    lines = [f"node {now.node} on {', '.join(now.endpoints) or '-'}: "
             f"{t.get('frames_in', 0):,} frames in, {t.get('frames_out', 0):,} out"]
    if now.drops:
        lines.append("drops: " + ", ".join(f"{k} {v}" for k, v in sorted(now.drops.items())))
    for link in now.links:
        state = "up" if link.get("connected") else "down"
        lines.append(f"link {link.get('endpoint')} -> {link.get('peer') or '?'}: {state}")
    lines.append("channels:")
    if not now.channels:
        lines.append("  (none)")
    for channel, members in sorted(now.channels.items()):
        lines.append(f"  {channel}: {', '.join(sorted(members))}")
    header = ["kind", "name", "in/s", "out/s", "queued", "drops"]
    rows = _rows(now, before)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines.append("connections:")
    lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    return "\n".join(lines) + "\n"


def _render_rich(now: Snapshot, before: Snapshot | None) -> Any:
    from rich.console import Group
    from rich.table import Table

    t = now.totals
    head = Table.grid(padding=(0, 2))
    head.add_row(f"[bold]node[/] {now.node}", ", ".join(now.endpoints),
                 f"{t.get('frames_in', 0):,} frames in", f"{t.get('frames_out', 0):,} out")
    links = Table("link", "peer", "state", title="links", expand=True)
    for link in now.links:
        links.add_row(str(link.get("endpoint")), str(link.get("peer") or "?"),
                      "[green]up[/]" if link.get("connected") else "[red]down[/]")
    channels = Table("channel", "members", title="channels", expand=True)
    for channel, members in sorted(now.channels.items()):
        channels.add_row(channel, ", ".join(sorted(members)))
    conns = Table("kind", "name", "in/s", "out/s", "queued", "drops", title="connections",
                  expand=True)
    for r in _rows(now, before):
        conns.add_row(*r)
    return Group(head, links, channels, conns)


async def run_top(fetch: Callable[[], Any], *, interval: float = 1.0, count: int | None = None,
                  out: IO[str] | None = None) -> None:
    """Refresh every ``interval`` seconds (``count`` times, or until cancelled).

    ``fetch`` is an async function returning a node report.
    """
    stream = out or sys.stdout
    live = None
    if stream.isatty():
        try:
            from rich.console import Console
            from rich.live import Live

            live = Live(console=Console(file=stream), auto_refresh=False)
        except ImportError:
            live = None  # no rich: plain text blocks
    before: Snapshot | None = None
    shown = 0
    if live is not None:
        live.start()
    try:
        while count is None or shown < count:
            now = snapshot_from_report(await fetch())
            if live is not None:
                live.update(_render_rich(now, before), refresh=True)
            else:
                stream.write(render_text(now, before) + "\n")
                stream.flush()
            before = now
            shown += 1
            if count is None or shown < count:
                await anyio.sleep(interval)  # the refresh period, not a wait for state
    finally:
        if live is not None:
            live.stop()




# -- the `slim-agents top` command -------------------------------------------------------


def add_top_arguments(parser: Any) -> None:
    parser.add_argument("--node", default="http://127.0.0.1:46357",
                        help="the node's URL (default http://127.0.0.1:46357)")
    parser.add_argument("--secret", default=None,
                        help="shared secret of the node (or $SLIM_SHARED_SECRET)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    parser.add_argument("--count", type=int, default=None, help="stop after N refreshes")
    parser.add_argument("--json", action="store_true", help="print each report as JSON")


async def run_top_command(args: Any) -> int:
    import json
    import os

    from ._app import open_app

    secret = args.secret or os.environ.get("SLIM_SHARED_SECRET") or \
        "slim-agents-development-secret-not-for-production"
    async with open_app(f"slim/top/viewer-{os.getpid()}", node=args.node, secret=secret,
                        accept_commands=False) as app:
        if args.json:
            shown = 0
            while args.count is None or shown < args.count:
                print(json.dumps(await app.node_report(), sort_keys=True), flush=True)
                shown += 1
                if args.count is None or shown < args.count:
                    await anyio.sleep(args.interval)
            return 0
        await run_top(app.node_report, interval=args.interval, count=args.count)
    return 0
