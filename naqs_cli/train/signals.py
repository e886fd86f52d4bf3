"""SIGINT/SIGTERM during training: finish the step, save, then stop with a resume hint."""

from __future__ import annotations

import contextlib
import signal
from typing import Any


class SignalCatcher:
    """Turn SIGINT/SIGTERM into a flag the training loop checks after each step.

    A second signal (with `immediate`, the first) stops at once by raising KeyboardInterrupt,
    except inside `critical()` blocks (HDF5 writes, checkpoint writes), which it lets finish
    first.
    """

    def __init__(self, immediate: bool = False) -> None:
        self.immediate = immediate
        self.signal_name: str | None = None
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._critical = 0
        self._abort = False

    def __enter__(self) -> SignalCatcher:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signal_name is None
        if first:
            self.signal_name = signal.Signals(signum).name
            self.signum = signum
        if first and not self.immediate:
            return
        if self._critical:
            self._abort = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self):
        """Defer a second signal's immediate stop until the block has finished."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if self._abort and not self._critical:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
