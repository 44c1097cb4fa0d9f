"""``fedq report RUN -o report.html``: the dashboard's views of a run as one self-contained HTML
file (its data, CSS and JS inlined; nothing fetched), to attach to an audit."""

from __future__ import annotations

import time
from pathlib import Path

from fedq.dashboard import page
from fedq.dashboard.data import snapshot
from fedq.dashboard.source import read_records
from shared.files import write_atomic


def build(run_dir: Path, now: float | None = None) -> str:
    """The report's HTML for ``run_dir`` as its files are now."""
    return page.render(snapshot(read_records(run_dir), time.time() if now is None else now))


def run(run_dir: Path, out: Path) -> str:
    html = build(run_dir)
    write_atomic(out, html.encode("utf-8"))
    return f"wrote {out} ({len(html) / 1e3:.0f} kB): the views of {run_dir}, self-contained"
