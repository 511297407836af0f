"""Progress on the command line, fed by engine events: one bar over the nodes to run."""

from __future__ import annotations

import sys
from typing import Any

from graphflow.events import Event, NodeFinished, NodeProgress, NodeStarted, RunStarted


class ProgressDisplay:
    """A tqdm bar counting finished nodes; the running node and its step (k/n) show beside it."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: Any = None

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        if isinstance(event, RunStarted):
            from tqdm import tqdm

            self.close()
            self._bar = tqdm(total=event.to_run, unit="node", file=sys.stderr, leave=False,
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

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
