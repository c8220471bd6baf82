"""Generated from protos/trio_mailer/grpc_std by protos/generate.py. Do not edit."""
