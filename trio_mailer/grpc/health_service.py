"""The standard gRPC health service, ``grpc.health.v1.Health``: Check, List and Watch.

Theory of operation
-------------------
``HealthState`` holds one ``ServingStatus`` per known service name; ``""`` stands for the server
as a whole and is always known. The composition root changes it with ``set()`` (synchronous,
never blocks); the gRPC handlers read it.

Watchers do not get a queue of events. Each ``watch()`` remembers the last status it yielded
and parks on the service's ``trio.lowlevel.ParkingLot``; ``set()`` wakes the lot only when a
status really changes. A woken watcher reads the status *now* and yields it only if it differs
from the last one it yielded. So a slow watcher (a client that does not read, its HTTP/2 window
full) holds no backlog: flips that happen while it is busy collapse into the latest status, and
one that ends where it began is not sent at all. Memory per watcher is one frame and one parked
task, whatever the rate of change.

A watcher costs nothing once its iterator is closed: the ``finally`` of ``watch()`` drops its
count, and the lot of a service nobody watches is dropped too, so a client watching made-up
names leaves nothing behind. ``statistics().watchers`` counts the open iterators. For a Watch
call this relies on the gRPC server cancelling the handler when the client goes away (purerpc
itself does not notice a reset stream: see ``grpc/listener.py``).

Per the health-checking spec (doc/health-checking.md in the gRPC repository): Check on an
unknown service is NOT_FOUND; Watch on an unknown service sends SERVICE_UNKNOWN and keeps the
stream open, and sends the real status once the service becomes known.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import aclosing
from typing import Any

import attrs
import purerpc

from trio_mailer.grpc_std.health.v1 import health_pb2
from trio_mailer.grpc_std.health.v1.health_grpc import HealthServicer
from trio_mailer.wakeups import Wakeups

SERVICE_NAME = "grpc.health.v1.Health"
# The file that declares the service, for server reflection.
FILE_DESCRIPTOR = health_pb2.DESCRIPTOR

# How much of an unknown service name is echoed back in a NOT_FOUND message.
_MAX_ECHOED_CHARS = 100


class ServingStatus(enum.Enum):
    """``grpc.health.v1.HealthCheckResponse.ServingStatus``, same names and numbers."""

    UNKNOWN = 0
    SERVING = 1
    NOT_SERVING = 2
    SERVICE_UNKNOWN = 3  # only ever sent by Watch, never stored


@attrs.frozen
class HealthStatistics:
    services: int  # known services, "" included
    watchers: int  # open watch() iterators: one per Watch call in progress
    watched: int  # service names with at least one watcher, known or not


class HealthState:
    """The serving status of the server ("") and of each named service."""

    def __init__(
        self, services: Iterable[str], initial: ServingStatus = ServingStatus.NOT_SERVING
    ) -> None:
        _check_settable(initial)
        self._statuses: dict[str, ServingStatus] = dict.fromkeys(["", *services], initial)
        self._wakeups = Wakeups()
        self._watching = 0  # open watch() iterators

    def set(self, status: ServingStatus, service: str | None = None) -> None:
        """Set the status of ``service`` (making it known), or of every known service.

        Args:
            status: UNKNOWN, SERVING or NOT_SERVING.
            service: a service name, ``""`` for the whole server, ``None`` for every known
                service including ``""``.

        Raises:
            ValueError: ``status`` is SERVICE_UNKNOWN (Watch's answer, not a status to store).
        """
        _check_settable(status)
        for name in list(self._statuses) if service is None else [service]:
            if self._statuses.get(name) is status:
                continue  # unchanged: nobody is woken
            self._statuses[name] = status
            self._wakeups.wake(name)

    def get(self, service: str) -> ServingStatus | None:
        """The status of ``service``; ``None`` when it is unknown."""
        return self._statuses.get(service)

    def snapshot(self) -> dict[str, ServingStatus]:
        """Every known service and its status, at this moment."""
        return dict(self._statuses)

    async def watch(self, service: str) -> AsyncGenerator[ServingStatus, None]:
        """Yield the status of ``service`` now, then again whenever it changes.

        SERVICE_UNKNOWN while the service is unknown. Changes that happen while the consumer is
        busy are coalesced: it gets the latest status, and nothing when that is the status it
        last got. Close the iterator (``contextlib.aclosing``) to stop watching.
        """
        self._watching += 1
        try:
            last = self._statuses.get(service, ServingStatus.SERVICE_UNKNOWN)
            yield last
            while True:
                current = self._statuses.get(service, ServingStatus.SERVICE_UNKNOWN)
                if current is last:
                    await self._wakeups.wait(service)
                    continue
                last = current
                yield current
        finally:
            self._watching -= 1

    def statistics(self) -> HealthStatistics:
        return HealthStatistics(
            services=len(self._statuses),
            watchers=self._watching,
            watched=self._wakeups.keys(),
        )


def _check_settable(status: ServingStatus) -> None:
    if status is ServingStatus.SERVICE_UNKNOWN:
        raise ValueError("status: expected UNKNOWN, SERVING or NOT_SERVING, got SERVICE_UNKNOWN")


def _response(status: ServingStatus) -> Any:
    return health_pb2.HealthCheckResponse(status=status.name)


class _HealthService(HealthServicer):  # type: ignore[misc]  # generated, untyped base
    def __init__(self, state: HealthState) -> None:
        self._state = state

    async def Check(self, message: Any) -> Any:
        status = self._state.get(message.service)
        if status is None:
            name = message.service[:_MAX_ECHOED_CHARS]  # repr escapes any control character
            raise purerpc.RpcFailedError(
                purerpc.Status(purerpc.StatusCode.NOT_FOUND, f"service: unknown service {name!r}")
            )
        return _response(status)

    async def List(self, message: Any) -> Any:
        statuses = self._state.snapshot()
        return health_pb2.HealthListResponse(
            statuses={name: _response(status) for name, status in statuses.items()}
        )

    async def Watch(self, message: Any) -> AsyncIterator[Any]:
        # aclosing: when purerpc closes this generator (the call ended or was cancelled), the
        # watch ends with it at once, not whenever the garbage collector gets to it.
        async with aclosing(self._state.watch(message.service)) as statuses:
            async for status in statuses:
                yield _response(status)


def health_service(state: HealthState) -> purerpc.Service:
    """The ``grpc.health.v1.Health`` service answering from ``state``, for ``serve_grpc``."""
    service: purerpc.Service = _HealthService(state).service
    return service
