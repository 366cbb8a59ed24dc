"""How a run is asked to stop: SIGINT or SIGTERM ends it cleanly after the current epoch."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any


class StopRequest:
    """While entered (in the main thread), the first SIGINT/SIGTERM sets ``requested``, so the run
    stops after the current epoch; a second one abandons the epoch (KeyboardInterrupt: the last
    checkpoint stays). The previous handlers come back on exit."""

    def __init__(self, say: Callable[[str], None]):
        self.requested = False
        self.say = say
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.say(f"{signal.Signals(signum).name}: stopping after this epoch "
                 "(again to abandon the epoch; the last checkpoint stays)")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
