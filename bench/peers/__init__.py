"""Peers: the Mailer service's SendPass built the way a team would build it on stock stacks.

``aio_server.py`` (Python: ``grpc.aio`` + ``aiosmtplib`` + ``sqlite3``) and ``node/peer.js``
(Node: ``@grpc/grpc-js`` + ``nodemailer`` + ``better-sqlite3``) do trio-mailer's job for one
mail: validate the request, refuse it at once when the bounded queue is full, render the
shipped ``password`` template, commit the mail to SQLite (WAL, ``synchronous=FULL``) before
answering ``sent=true``, and deliver it over one pooled SMTP session with verified TLS.
``compare.py`` measures them beside trio-mailer (``bench/run.py --only peers``); ``launch.py``
starts them.
"""
