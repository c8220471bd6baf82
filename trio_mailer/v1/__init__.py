"""Generated from protos/trio_mailer/v1 by protos/generate.py. Do not edit."""
