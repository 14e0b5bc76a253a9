"""`tierline status` as a picture: each tier's share of the traffic, queue depth and escalation rate as bars.

The numbers are laid out once (`tier_rows`, `replica_rows`); rich draws them in colour when it
is installed (`tierline[platform]`), plain text otherwise: `pip install tierline` is gRPC and
protobuf only, and the bars are plain characters. `--watch` redraws in place every few seconds,
as `top` does (rich's Live, or the terminal's clear-screen without it).
"""

from __future__ import annotations

import sys
import time
from typing import Callable

BAR_WIDTH = 20  # characters of a full bar
_EIGHTHS = " ▏▎▍▌▋▊▉"  # a bar's last, partly filled character, by eighths
TIER_COLUMNS = ("tier", "replicas", "queue depth", "traffic share", "escalation rate", "answered")
REPLICA_COLUMNS = ("tier", "id", "version", "requests", "errors", "cancelled", "avg ms", "queue", "silent")
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """`fraction` (0..1, clipped) of `width` characters, to an eighth of one; padded to `width`."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (_EIGHTHS[part] if part else "")).ljust(width)


def title(st) -> str:
    return (f"Tierline: {st.model} - {st.answered:,} requests answered by the router; "
            f"API keys {'required' if st.auth_enabled else 'OFF'}")


def tier_rows(st) -> list[tuple[str, ...]]:
    """One row per tier, cheapest first; the queue bars are scaled to the deepest queue."""
    deepest = max((t.queue_depth for t in st.tiers), default=0)
    asked = max((len(f"{t.asked:,}") for t in st.tiers), default=1)  # the bars start in one column
    return [(t.tier, replica_count(t),
             f"{bar(t.queue_depth / deepest if deepest else 0.0, BAR_WIDTH // 2)} {t.queue_depth:>4}",
             f"{bar(t.traffic_share)} {t.traffic_share:6.1%}",
             f"{bar(t.escalation_rate)} {t.escalation_rate:6.1%} of {t.asked:>{asked},}",
             f"{t.answered:,}") for t in st.tiers]


def replica_count(tier) -> str:
    """Replicas that answered; those silent since (busy, or gone) in brackets; "down" when none answered."""
    silent = len(tier.silent_replicas)
    return (f"{len(tier.replicas)}" if tier.replicas else "0 (down)") + (f" (+{silent} silent)" if silent else "")


def replica_rows(st) -> list[tuple[str, ...]]:
    return [(t.tier, r.id, r.version, f"{r.requests:,}", f"{r.errors:,}", f"{r.cancelled:,}", f"{r.average_ms:.1f}",
             str(r.queue_depth),
             f"{r.silent_s:.1f} s" if r.silent_s else "") for t in st.tiers for r in [*t.replicas, *t.silent_replicas]]


def render_text(st) -> str:
    return "\n".join([table(title(st), TIER_COLUMNS, tier_rows(st)), "",
                      table("Replicas (nats.micro $SRV.STATS)", REPLICA_COLUMNS, replica_rows(st), left=3)])


def table(heading: str, columns: tuple[str, ...], rows: list[tuple[str, ...]], left: int = 1) -> str:
    """Plain text, the first `left` columns left-aligned and the ones after them right-aligned."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([heading, line(columns), line("-" * w for w in widths), *(line(r) for r in rows)])


def render_rich(st):
    """The same rows as a rich renderable: bars in colour, a tier with no replica in red."""
    from rich.console import Group
    from rich.table import Table

    tiers = Table(title=title(st), title_justify="left")
    for i, c in enumerate(TIER_COLUMNS):
        tiers.add_column(c, justify="left" if i == 0 else "right",
                         style={"traffic share": "green", "escalation rate": "yellow", "queue depth": "cyan"}.get(c))
    for t, row in zip(st.tiers, tier_rows(st)):
        tiers.add_row(*row, style=None if t.replicas else "red")
    replicas = Table(title="Replicas (nats.micro $SRV.STATS)", title_justify="left")
    for i, c in enumerate(REPLICA_COLUMNS):
        replicas.add_column(c, justify="left" if i < 3 else "right")
    for row in replica_rows(st):
        replicas.add_row(*row)
    return Group(tiers, replicas)


def _rich_console():
    """rich's console when rich is installed and stdout is a terminal; None for plain text."""
    if not sys.stdout.isatty():
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console()


def show(st) -> None:
    console = _rich_console()
    if console is None:
        print(render_text(st))
    else:
        console.print(render_rich(st))


def watch(fetch: Callable[[], object], interval_s: float, rounds: int | None = None) -> None:
    """Redraw `fetch()`'s status every `interval_s` until Ctrl-C (or after `rounds` draws)."""
    console, live, n = _rich_console(), None, 0
    try:
        while True:
            st = fetch()
            if console is None:
                print((CLEAR if sys.stdout.isatty() else "") + render_text(st) +
                      f"\n\n(every {interval_s:g} s; Ctrl-C stops)", flush=True)
            elif live is None:
                from rich.live import Live

                live = Live(render_rich(st), console=console, auto_refresh=False)
                live.start(refresh=True)
            else:
                live.update(render_rich(st), refresh=True)
            n += 1
            if rounds is not None and n >= rounds:
                return
            time.sleep(interval_s)
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
