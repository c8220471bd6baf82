"""Every use of purerpc's private parts, in one place (see tests/test_purerpc_internals.py).

purerpc 0.8.0 is pinned. The server side no longer touches its internals: the listener drives
h2 itself (``http2_server.py``) and uses only purerpc's public API (``Service``, ``Status``,
``RpcFailedError``, the ``call_server_*`` wrappers, ``RequestReceived``). What is left is the
client side of ``trio-mailer send``: purerpc has no public way to build a channel on a stream
it did not open, so ``client_channel`` fills in a ``purerpc.client._Channel`` by hand.

When a purerpc upgrade moves one of these, the canary test fails naming it; adapt this module
(nothing else imports purerpc's private names).
"""

from __future__ import annotations

import inspect
from contextlib import AsyncExitStack
from typing import Any

import anyio.abc
import purerpc
import purerpc.client
from purerpc.grpc_proto import GRPCProtoSocket
from purerpc.grpclib.config import GRPCConfiguration

# The private names used here, for the canary: (object, attribute, what it is).
PRIVATE_NAMES = (("purerpc.client", "_Channel", "the channel class Client(...) accepts"),)
# ``_Channel`` sets this attribute in ``__aenter__``; stubs read it through ``Client``.
CHANNEL_SOCKET_ATTRIBUTE = "_grpc_socket"

Channel = purerpc.client._Channel


async def client_channel(
    stack: AsyncExitStack, host: str, port: int, stream: anyio.abc.ByteStream
) -> Any:
    """A purerpc channel speaking on ``stream`` (which the caller closes), for ``Client``."""
    channel = purerpc.client._Channel(host, port)
    socket = await stack.enter_async_context(
        GRPCProtoSocket(GRPCConfiguration(client_side=True), stream)
    )
    setattr(channel, CHANNEL_SOCKET_ATTRIBUTE, socket)
    return channel


def problems() -> list[str]:
    """What moved in purerpc, in words; empty while this module still fits it."""
    found = []
    if not inspect.isclass(getattr(purerpc.client, "_Channel", None)):
        found.append("purerpc.client._Channel is gone (client_channel builds one)")
    else:
        source = inspect.getsource(purerpc.client._Channel)
        if f"self.{CHANNEL_SOCKET_ATTRIBUTE}" not in source:
            found.append(
                f"purerpc.client._Channel no longer keeps its socket in {CHANNEL_SOCKET_ATTRIBUTE}"
            )
    stub_source = inspect.getsource(purerpc.client)
    if f"channel.{CHANNEL_SOCKET_ATTRIBUTE}" not in stub_source:
        found.append(
            f"purerpc.client no longer reads channel.{CHANNEL_SOCKET_ATTRIBUTE} to open streams"
        )
    return found
