"""grpcio's futures, awaited from Trio without a thread per call.

Theory of operation: grpcio's C-core runs every call on its own polling thread. A unary call
started with ``.future()`` completes there and runs its done callbacks there; the callback hands
one ``trio.Event.set`` to the Trio run through its token (``run_sync_soon`` is the thread-safe
entry into a Trio run), and the waiting task wakes up in Trio. No Trio worker thread is used. If
the Trio task is cancelled while it waits, the gRPC call is cancelled too (the service sees
CANCELLED), and the ``trio.Cancelled`` goes on.

A server stream (``WatchStatus``) has no per-message callback in grpcio's synchronous API: each
``next()`` blocks. ``next_message`` runs it in a Trio worker thread (``abandon_on_cancel``), and
cancels the call on cancellation so that the abandoned ``next()`` returns at once; so a watch
that waits for its next change holds one cached worker thread, and a unary call holds none.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import grpc
import trio

T = TypeVar("T")
_END = object()


async def await_future(future: grpc.Future) -> Any:
    """The result of a grpcio future, awaited in Trio; cancels the call if the task is cancelled.

    Raises:
        grpc.RpcError: the call ended with a status other than OK.
    """
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_future: object) -> None:  # on grpcio's thread (or at once, if already done)
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:  # the Trio run has ended: nobody is waiting
            pass

    future.add_done_callback(wake)
    try:
        await done.wait()
    except BaseException:  # trio.Cancelled, KeyboardInterrupt: the call must not outlive its task
        future.cancel()
        raise
    return future.result()


async def next_message(call: Iterator[T], cancel: grpc.Future) -> T | None:
    """The next message of a server stream, or None at its end; cancels ``cancel`` (the call)
    if the task is cancelled.

    Raises:
        grpc.RpcError: the stream ended with a status other than OK.
    """

    def read() -> object:
        return next(call, _END)

    try:
        item = await trio.to_thread.run_sync(read, abandon_on_cancel=True)
    except BaseException:
        cancel.cancel()
        raise
    if item is _END:
        return None
    return item  # type: ignore[return-value]
