"""Generated from protos/trio_mailer/v1/mailer.proto by protos/generate.py. Do not edit."""
