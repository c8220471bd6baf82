"""Tasks waiting for news about a key (a service name, a message id), and waking them.

One ``trio.lowlevel.ParkingLot`` per key, made by the first waiter and dropped with the last, so
waiters that go away (a client that hung up) leave nothing behind, whatever keys they used.
"""

from __future__ import annotations

import attrs
import trio


@attrs.define
class Wakeups:
    _lots: dict[str, trio.lowlevel.ParkingLot] = attrs.Factory(dict)
    _waiting: dict[str, int] = attrs.Factory(dict)

    async def wait(self, key: str) -> None:
        """Return at the next ``wake(key)``."""
        self._waiting[key] = self._waiting.get(key, 0) + 1
        lot = self._lots.setdefault(key, trio.lowlevel.ParkingLot())
        try:
            await lot.park()
        finally:
            remaining = self._waiting[key] - 1
            if remaining:
                self._waiting[key] = remaining
            else:
                del self._waiting[key]
                del self._lots[key]

    def wake(self, key: str) -> None:
        lot = self._lots.get(key)
        if lot is not None:
            lot.unpark_all()

    def waiting(self) -> int:
        """Tasks waiting now, over all keys."""
        return sum(self._waiting.values())

    def keys(self) -> int:
        """Keys with at least one waiter."""
        return len(self._lots)
