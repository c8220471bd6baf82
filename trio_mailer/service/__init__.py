"""The use cases: what the service does, whoever asks (a gRPC handler, the CLI, a test).

``accept_mail.AcceptMail`` (accept a mail: admission, compose, store, queue),
``mail_status.MailStatusLookup`` (answer a status, watch a mail), ``admission.AdmissionControl``
(idempotency keys, rate limits, the suppression list; the admin use cases list and remove
suppressions). The gRPC layer (``trio_mailer/grpc/``) decodes, calls one of these, encodes.
"""
