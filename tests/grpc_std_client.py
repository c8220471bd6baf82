"""Stock grpcio health and reflection clients, for tests/test_health.py and test_reflection.py.

Run as a script, in a process of its own, so that a blocking grpcio client never shares the
test's Trio thread, and the stock modules are tested exactly as another team runs them. (They no
longer clash with ``trio_mailer.grpc_std``, whose modules use private descriptor pools:
tests/test_generated_code.py imports both in one process.) Every result is one JSON object per
line on stdout.

    grpc_std_client.py PORT check SERVICE...  one line per service: its status or error code
    grpc_std_client.py PORT list              the statuses of every service
    grpc_std_client.py PORT watch SERVICE     a line per update; stdin "cancel" cancels the call
                                              (the channel stays open until stdin is closed)
    grpc_std_client.py PORT reflect           one line: what reflection told about the server
    grpc_std_client.py descriptors            the stock packages' serialized file descriptors
"""

from __future__ import annotations

import base64
import json
import sys
import threading
from typing import Any

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

TIMEOUT_S = 10
_print_lock = threading.Lock()


def emit(value: Any) -> None:
    with _print_lock:
        print(json.dumps(value), flush=True)


def status_name(status: int) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def check(channel: grpc.Channel, services: list[str]) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in services:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            emit({"service": service, "error": exc.code().name, "details": exc.details()})
        else:
            emit({"service": service, "status": status_name(reply.status)})


def list_statuses(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).List(
        health_pb2.HealthListRequest(), timeout=TIMEOUT_S
    )
    emit({name: status_name(value.status) for name, value in reply.statuses.items()})


def watch(channel: grpc.Channel, service: str) -> None:
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service))

    def read() -> None:
        try:
            for reply in call:
                emit({"status": status_name(reply.status)})
        except grpc.RpcError as exc:
            emit({"ended": exc.code().name})
        else:
            emit({"ended": "OK"})

    reader = threading.Thread(target=read)
    reader.start()
    for line in sys.stdin:
        if line.strip() == "cancel":
            call.cancel()
            reader.join()
    # stdin closed: the test is done with us; the channel closes on the way out.
    call.cancel()
    reader.join()


def _one_stream(
    channel: grpc.Channel, requests: list[reflection_pb2.ServerReflectionRequest], package: str
) -> list[reflection_pb2.ServerReflectionResponse]:
    """All ``requests`` on one ServerReflectionInfo stream of ``grpc.reflection.<package>``.

    grpcio-reflection only ships v1alpha stubs; v1 has the same messages, so the v1alpha
    classes serialize them, sent to the v1 method.
    """
    if package == "v1alpha":
        info = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
    else:
        info = channel.stream_stream(
            f"/grpc.reflection.{package}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
    return list(info(iter(requests), timeout=TIMEOUT_S))


def _describe(response: reflection_pb2.ServerReflectionResponse) -> dict[str, Any]:
    kind = response.WhichOneof("message_response")
    result: dict[str, Any] = {
        "kind": kind,
        "original_request": response.original_request.WhichOneof("message_request"),
    }
    if kind == "file_descriptor_response":
        from google.protobuf.descriptor_pb2 import FileDescriptorProto

        result["files"] = [
            FileDescriptorProto.FromString(data).name
            for data in response.file_descriptor_response.file_descriptor_proto
        ]
    elif kind == "error_response":
        result["code"] = response.error_response.error_code
        result["message"] = response.error_response.error_message
    elif kind == "list_services_response":
        result["services"] = [s.name for s in response.list_services_response.service]
    elif kind == "all_extension_numbers_response":
        result["base_type_name"] = response.all_extension_numbers_response.base_type_name
        result["numbers"] = list(response.all_extension_numbers_response.extension_number)
    return result


def reflect(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = DescriptorPool(database)
    mailer = pool.FindServiceByName("trio_mailer.v1.Mailer")
    send_pass = mailer.FindMethodByName("SendPass")
    watch_method = pool.FindServiceByName("grpc.health.v1.Health").FindMethodByName("Watch")
    try:
        database.FindFileContainingSymbol("no.such.Service")
    except KeyError:
        unknown_is_key_error = True
    else:
        unknown_is_key_error = False

    request = reflection_pb2.ServerReflectionRequest
    extension = reflection_pb2.ExtensionRequest
    requests = [
        request(host="example", list_services=""),
        request(file_containing_symbol="trio_mailer.v1.Mailer"),
        request(file_containing_symbol="trio_mailer.v1.Mailer.SendPass"),
        request(file_containing_symbol="grpc.health.v1.HealthCheckResponse.ServingStatus"),
        request(file_containing_symbol="grpc.health.v1.HealthCheckResponse.SERVING"),
        request(file_containing_symbol="no.such.Service"),
        request(file_by_filename="trio_mailer/v1/mailer.proto"),
        request(file_by_filename="no/such.proto"),
        request(all_extension_numbers_of_type="trio_mailer.v1.MsgRequest"),
        request(all_extension_numbers_of_type="no.such.Message"),
        request(
            file_containing_extension=extension(
                containing_type="trio_mailer.v1.MsgRequest", extension_number=100
            )
        ),
        request(),
    ]
    emit(
        {
            "services": sorted(database.get_services()),
            "send_pass_input": send_pass.input_type.full_name,
            "send_pass_output": send_pass.output_type.full_name,
            "watch_server_streaming": watch_method.server_streaming,
            "unknown_symbol_is_key_error": unknown_is_key_error,
            "v1alpha": [_describe(r) for r in _one_stream(channel, requests, "v1alpha")],
            "v1": [_describe(r) for r in _one_stream(channel, requests, "v1")],
            "valid_host": _one_stream(channel, requests[:1], "v1")[0].valid_host,
        }
    )


def descriptors() -> None:
    emit(
        {
            name: base64.b64encode(module.DESCRIPTOR.serialized_pb).decode()
            for name, module in [("health", health_pb2), ("reflection_v1alpha", reflection_pb2)]
        }
    )


def main(argv: list[str]) -> int:
    if argv == ["descriptors"]:
        descriptors()
        return 0
    port, command, *args = argv
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        if command == "check":
            check(channel, args)
        elif command == "list":
            list_statuses(channel)
        elif command == "watch":
            (service,) = args
            watch(channel, service)
        elif command == "reflect":
            reflect(channel)
        else:
            raise SystemExit(f"unknown command {command!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
