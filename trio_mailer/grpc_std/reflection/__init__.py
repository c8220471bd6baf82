"""Generated from protos/trio_mailer/grpc_std/reflection by protos/generate.py. Do not edit."""
