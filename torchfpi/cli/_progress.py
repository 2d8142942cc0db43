"""A progress line for a long call that reports nothing itself (one fixed-point solve)."""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Iterator


@contextlib.contextmanager
def ticking(desc: str, enabled: bool = True, every: float = 0.5) -> Iterator[None]:
    """Show ``desc: 12s`` on a terminal's stderr while the body runs (nothing when not a terminal).

    Example:
        >>> with ticking("solving", enabled=False):
        ...     pass
    """
    if not (enabled and sys.stderr.isatty()):
        yield
        return
    from tqdm import tqdm

    bar = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}", file=sys.stderr, leave=False)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(every):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.close()
