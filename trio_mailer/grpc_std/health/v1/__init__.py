"""Generated from protos/trio_mailer/grpc_std/health/v1 by protos/generate.py. Do not edit."""
