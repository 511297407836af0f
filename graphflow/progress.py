"""Progress on the command line, fed by engine events: a bar over the nodes to run on a terminal, plain lines
(one per finished node) where stderr is a log file or a pipe, which a redrawn bar would fill with carriage
returns."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from graphflow.errors import printable
from graphflow.events import Event, NodeFinished, NodeProgress, NodeStarted, RunStarted


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class ProgressDisplay:
    """A tqdm bar counting finished nodes, the running node and its step (k/n) beside it; without a terminal, a
    line per finished node: `[k/n] node (Type) 1.23 s`."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, terminal: bool | None = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = is_terminal(self.stream) if terminal is None else terminal
        self._bar: Any = None
        self._total = self._done = 0

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        if not self.terminal:
            self._line(event)
            return
        if isinstance(event, RunStarted):
            from tqdm import tqdm

            self.close()
            self._bar = tqdm(total=event.to_run, unit="node", file=self.stream, leave=False,
                             disable=event.to_run == 0)
        elif self._bar is None:
            return
        elif isinstance(event, NodeStarted):
            self._bar.set_description_str(f"{event.node} ({event.type})")
        elif isinstance(event, NodeProgress):
            self._bar.set_postfix_str(f"step {event.step}/{event.total}")
        elif isinstance(event, NodeFinished):
            self._bar.set_postfix_str("")
            self._bar.update(1)

    def _line(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self._total, self._done = event.to_run, 0
        elif isinstance(event, NodeFinished):
            self._done += 1
            print(f"[{self._done}/{self._total}] {printable(event.node)} ({printable(event.type)}) "
                  f"{event.seconds:.2f} s", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
