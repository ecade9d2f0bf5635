"""Write a bench's results into ``docs/performance.md``, the one page of performance figures.

Each bench owns the sections it names: ``update(section, command, body)``
replaces the text between that section's markers (or appends the section),
headed by the command that produced it, the date and the machine, so the
page always shows what the latest run of each bench measured.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import sys

PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "performance.md")
HEAD = """# Performance

Every figure on this page is written by the bench named above it, with the
command that produced it; rerun the command to refresh its section.  Ratios
are measured side by side in one run.  See each bench's docstring for what
exactly it times.
"""


def machine() -> str:
    import jax

    dev = jax.devices()[0]
    kind = dev.device_kind if dev.platform != "cpu" else f"{os.cpu_count()} CPU cores"
    return f"{platform.machine()}, {kind}, jax {jax.__version__}"


def update(section: str, title: str, command: str, body: str, page: str = PAGE) -> str:
    """Replace (or add) ``section`` of ``page``; returns the page's path."""
    text = open(page).read() if os.path.isfile(page) else HEAD
    start, end = f"<!-- {section}: start -->", f"<!-- {section}: end -->"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    block = (f"{start}\n## {title}\n\n```\n{command}\n```\n\n{stamp}, {machine()}.\n\n{body.strip()}\n{end}")
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(page), exist_ok=True)
    tmp = page + f".tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, page)
    return page


class _Tee:
    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text):
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


@contextlib.contextmanager
def recorded(enabled: bool, section: str, title: str, script: str, argv=None):
    """Print as usual; with ``enabled``, what was printed becomes ``section`` of the page
    (headed by the command: ``script`` and its arguments, ``--docs`` left out)."""
    if not enabled:
        yield
        return
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        yield
    finally:
        sys.stdout = tee.stream
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--docs"]
    print("wrote", update(section, title, " ".join(["python", script, *args]), "".join(tee.parts)))
