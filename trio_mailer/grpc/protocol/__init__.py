"""The gRPC front's HTTP/2 protocol layer, without I/O (as hypercorn's ``protocol/``):
``connection.ServerConnection`` (bytes in, events and bytes out), ``stream.GrpcStream`` (one
call's stream) and ``events`` (what the Trio layer, ``grpc/http2_server.py``, acts on)."""
