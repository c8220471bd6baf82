"""Generated from protos/trio_mailer/grpc_std/health by protos/generate.py. Do not edit."""
