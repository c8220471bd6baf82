"""Generated from protos/trio_mailer/grpc_std/reflection/v1 by protos/generate.py. Do not edit."""
