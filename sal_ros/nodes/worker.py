"""Latest-only hand-off between ROS callbacks and one worker thread.

Frames that arrive while the worker is busy replace the waiting one (and are counted): the worker always
takes the newest frame, so latency stays one frame deep instead of growing with a backlog.
"""
from __future__ import annotations

import threading
from typing import Any, Callable


class LatestSlot:
    """A depth-1 mailbox: ``put`` replaces what is waiting, ``take`` blocks for the next item."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._full = False
        self._closed = False
        self.replaced = 0  # items overwritten before the worker took them
        self.accepted = 0

    def put(self, item: Any) -> bool:
        """Store ``item``; True when it replaced one that was still waiting."""
        with self._cond:
            replaced = self._full
            self._item, self._full = item, True
            self.accepted += 1
            self.replaced += int(replaced)
            self._cond.notify()
            return replaced

    def take(self, timeout: float | None = None) -> tuple[bool, Any]:
        """``(True, item)`` as soon as one waits; ``(False, None)`` on timeout or after ``close``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._full or self._closed, timeout):
                return False, None
            if not self._full:
                return False, None
            item, self._item, self._full = self._item, None, False
            return True, item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def waiting(self) -> bool:
        """An item is in the slot, not yet taken."""
        return self._full


class Worker:
    """One daemon thread running ``handle(item)`` on items taken from a :class:`LatestSlot`.

    An exception from ``handle`` is passed to ``on_error`` (the node logs and counts it) and the loop goes on:
    one bad frame never stops the worker.
    """

    def __init__(self, name: str, handle: Callable[[Any], None], on_error: Callable[[BaseException], None],
                 setup: Callable[[], None] | None = None) -> None:
        """``setup`` runs first, on the worker thread (e.g. loading the model there); ``start`` waits for it."""
        self.slot = LatestSlot()
        self._handle = handle
        self._on_error = on_error
        self._setup = setup
        self._setup_done = threading.Event()
        self._setup_error: BaseException | None = None
        self.busy = threading.Event()  # set while handle() runs
        self.processed = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def name(self) -> str:
        return self._thread.name

    def start(self) -> "Worker":
        """Start the thread and wait for ``setup``; its exception is raised here (and the thread ends)."""
        self._thread.start()
        self._setup_done.wait()
        if self._setup_error is not None:
            raise self._setup_error
        return self

    def in_hand(self) -> int:
        """Items handed over and not finished: the one waiting in the slot and the one being handled."""
        return int(self.slot.waiting) + int(self.busy.is_set())

    def submit(self, item: Any) -> bool:
        """Hand ``item`` over; True when it replaced a waiting one (a dropped frame)."""
        return self.slot.put(item)

    def stop(self, timeout: float = 5.0) -> bool:
        """Close the slot and wait up to ``timeout`` for the item in hand; True when the thread has ended. A
        frame still in the model after that is left to finish on its own (its results are not published). Only
        the first call waits: a node's destroy_node after an ordered shutdown that already stopped it returns at
        once (launch escalates to SIGTERM 5 s after SIGINT)."""
        first = not self.slot.closed
        self.slot.close()
        if first and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            if self._setup is not None:
                self._setup()
        except BaseException as exc:  # noqa: BLE001 - handed to start(), which raises it in the caller
            self._setup_error = exc
            self.slot.close()
        finally:
            self._setup_done.set()
        while not self.slot.closed:
            ok, item = self.slot.take(timeout=0.5)
            if not ok:
                continue
            self.busy.set()
            try:
                self._handle(item)
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any one frame
                if not self.slot.closed:  # after stop() the node's publishers are being destroyed under it
                    self._on_error(exc)
            finally:
                self.processed += 1
                self.busy.clear()
