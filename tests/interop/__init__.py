"""The interop suite's clients nobody here wrote (issue 22): grpc-js scripts and their support."""
