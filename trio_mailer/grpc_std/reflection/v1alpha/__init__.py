"""Generated from protos/trio_mailer/grpc_std/reflection/v1alpha by protos/generate.py. Do not edit."""
