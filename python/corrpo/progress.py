"""Progress of a long command: a tqdm bar on a terminal, plain lines anywhere else.

In a log file, a pipe or a CI job a tqdm bar is not redrawn but appended: every refresh
adds a carriage-return record, and a bar refreshed while its count stands still (a study
waiting for its runs to write their plots) shows the same 100% line again and again. There
each line is whole (ends in a newline) and says something new: one at each milestone the
caller marks (an evaluation), one every ``every_s`` seconds at most otherwise, and one at
the end, never two for the same count.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


class Progress:
    """``total`` units of work, ``initial`` of them already done (a resumed run).

    enabled: False shows nothing either way (``--no-progress``). stream: where it goes
    (stderr by default); a bar when it is a terminal, lines otherwise.
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str,
        initial: int = 0,
        enabled: bool = True,
        stream: IO[str] | None = None,
        every_s: float = 60.0,
        smoothing: float = 0.3,
    ) -> None:
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.every_s = every_s
        self.status = ""
        self._started = self._last_line = time.monotonic()
        self._line_n = initial  # the count the last line showed (a resumed run's start is not news)
        self._bar: Any = None
        if enabled and is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream, smoothing=smoothing
            )

    def update(self, n: int = 1, *, status: str | None = None, milestone: bool = False) -> None:
        """``n`` more units done; ``status``: what to show beside the count from now on;
        ``milestone``: a moment worth its own line in a log (an evaluation)."""
        self.n += n
        if status is not None:
            self.status = status
        if self._bar is not None:
            if status is not None:
                self._bar.set_postfix_str(status, refresh=False)
            self._bar.update(n)  # redraws at most every 0.1 s
        elif self.enabled and (milestone or time.monotonic() - self._last_line >= self.every_s):
            self._line()

    def goto(self, n: int, *, status: str | None = None, milestone: bool = False) -> None:
        """The count is ``n`` (for callers that poll a count rather than add to it)."""
        self.update(n - self.n, status=status, milestone=milestone)

    def close(self) -> None:
        """Ends the bar, or writes the last line (unless the last one showed this count)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled:
            self._line()
        self.enabled = False  # a second close writes nothing

    def _line(self) -> None:
        if self.n == self._line_n:
            return
        now = time.monotonic()
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        text = f"{self.desc}: {self.unit} {self.n}/{self.total}{percent}, {now - self._started:.0f} s"
        print(text + (f", {self.status}" if self.status else ""), file=self.stream, flush=True)
        self._line_n, self._last_line = self.n, now

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_terminal(stream: IO[str]) -> bool:
    """Whether ``stream`` is a terminal, where a redrawn bar (tqdm's, transformers') belongs."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


__all__ = ["Progress", "is_terminal"]
