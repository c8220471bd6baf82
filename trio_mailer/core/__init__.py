"""The pure core: the decisions, with no I/O.

Nothing here imports trio, anyio, smtplib, sqlite3, ssl, purerpc or prometheus_client, not even
indirectly; ``tests/test_layers.py`` imports each module in a fresh interpreter to check. The
shell (``grpc/``, ``store/``, ``delivery/``, ``dev/``) does the waiting and calls in here.
"""
