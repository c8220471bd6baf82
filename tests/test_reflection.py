"""Server reflection: the descriptor index on its own, then the services against stock clients."""

from __future__ import annotations

import base64

import pytest
import trio
from google.protobuf import descriptor_pb2, descriptor_pool, text_format
from google.protobuf.descriptor import FileDescriptor

from trio_mailer.grpc import health_service as health
from trio_mailer.grpc.health_service import HealthState
from trio_mailer.grpc.listener import MAX_MESSAGE_BYTES
from trio_mailer.grpc.reflection_service import (
    FILE_DESCRIPTORS,
    SERVICE_NAMES,
    DescriptorIndex,
    NotFound,
    answer,
    reflection_services,
)
from trio_mailer.grpc_std.reflection.v1 import reflection_pb2 as v1_pb2
from trio_mailer.grpc_std.reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from trio_mailer.v1 import mailer_pb2

from .std_services import MAILER, open_std_server, run_client

FieldProto = descriptor_pb2.FieldDescriptorProto
OPTIONAL = FieldProto.LABEL_OPTIONAL

# ---- a proto2 (no syntax: the default) fixture with every kind of symbol, in its own pool ----


def _files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    base = descriptor_pb2.FileDescriptorProto(name="t/base.proto", package="t")
    message = base.message_type.add(name="Base")
    message.field.add(name="id", number=1, type=FieldProto.TYPE_INT32, label=OPTIONAL)
    message.extension_range.add(start=100, end=200)

    ext = descriptor_pb2.FileDescriptorProto(
        name="t/ext.proto", package="t.ext", dependency=["t/base.proto"]
    )
    outer = ext.message_type.add(name="Outer")
    outer.oneof_decl.add(name="choice")
    outer.field.add(
        name="pick", number=1, type=FieldProto.TYPE_STRING, label=OPTIONAL, oneof_index=0
    )
    outer.nested_type.add(name="Inner")
    outer.enum_type.add(name="Color").value.add(name="RED", number=0)
    outer.extension.add(
        name="nested_tag",
        number=101,
        extendee=".t.Base",
        type=FieldProto.TYPE_INT32,
        label=OPTIONAL,
    )
    ext.enum_type.add(name="Size").value.add(name="SMALL", number=0)
    ext.extension.add(
        name="tag", number=100, extendee=".t.Base", type=FieldProto.TYPE_STRING, label=OPTIONAL
    )
    service = ext.service.add(name="Svc")
    service.method.add(name="Do", input_type=".t.ext.Outer", output_type=".t.Base")

    # Imports both: the index must send t/base.proto once.
    top = descriptor_pb2.FileDescriptorProto(
        name="t/top.proto", package="t.top", dependency=["t/ext.proto", "t/base.proto"]
    )
    top.message_type.add(name="Top")
    return {f.name: f for f in [base, ext, top]}


FILES = _files()


def fixture_file(name: str) -> FileDescriptor:
    pool = descriptor_pool.DescriptorPool()  # not the default pool: nothing leaks out
    for proto in FILES.values():
        pool.AddSerializedFile(proto.SerializeToString())
    file: FileDescriptor = pool.FindFileByName(name)
    return file


def names(answer_files: tuple[bytes, ...]) -> list[str]:
    return [descriptor_pb2.FileDescriptorProto.FromString(data).name for data in answer_files]


@pytest.fixture
def index() -> DescriptorIndex:
    return DescriptorIndex.build(["t.ext.Svc"], [fixture_file("t/top.proto")])


@pytest.mark.parametrize(
    ("symbol", "file"),
    [
        ("t.Base", "t/base.proto"),
        ("t.Base.id", "t/base.proto"),
        ("t.ext.Outer", "t/ext.proto"),
        ("t.ext.Outer.pick", "t/ext.proto"),
        ("t.ext.Outer.choice", "t/ext.proto"),
        ("t.ext.Outer.Inner", "t/ext.proto"),
        ("t.ext.Outer.Color", "t/ext.proto"),
        ("t.ext.Outer.RED", "t/ext.proto"),
        ("t.ext.Outer.nested_tag", "t/ext.proto"),
        ("t.ext.Size", "t/ext.proto"),
        ("t.ext.SMALL", "t/ext.proto"),
        ("t.ext.tag", "t/ext.proto"),
        ("t.ext.Svc", "t/ext.proto"),
        ("t.ext.Svc.Do", "t/ext.proto"),
        ("t.top.Top", "t/top.proto"),
    ],
)
def test_every_kind_of_symbol_is_found_in_its_file(
    index: DescriptorIndex, symbol: str, file: str
) -> None:
    assert names(index.file_containing_symbol(symbol))[0] == file


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        ("t/base.proto", ["t/base.proto"]),
        ("t/ext.proto", ["t/ext.proto", "t/base.proto"]),
        ("t/top.proto", ["t/top.proto", "t/ext.proto", "t/base.proto"]),
    ],
)
def test_a_file_comes_first_then_its_imports_transitively_each_once(
    index: DescriptorIndex, file: str, expected: list[str]
) -> None:
    assert names(index.file_by_filename(file)) == expected


def test_file_answers_are_the_descriptors_themselves(index: DescriptorIndex) -> None:
    data = index.file_by_filename("t/ext.proto")[0]
    assert descriptor_pb2.FileDescriptorProto.FromString(data) == FILES["t/ext.proto"]


def test_extensions_are_found_by_type_and_number(index: DescriptorIndex) -> None:
    assert index.extension_numbers("t.Base") == [100, 101]
    assert index.extension_numbers("t.ext.Outer") == []
    assert names(index.file_containing_extension("t.Base", 101))[0] == "t/ext.proto"


@pytest.mark.parametrize(
    ("lookup", "field"),
    [
        (lambda i: i.file_by_filename("t/none.proto"), "file_by_filename"),
        (lambda i: i.file_containing_symbol("t.None"), "file_containing_symbol"),
        (lambda i: i.file_containing_symbol("t"), "file_containing_symbol"),
        (lambda i: i.file_containing_extension("t.Base", 150), "file_containing_extension"),
        (lambda i: i.file_containing_extension("t.None", 100), "file_containing_extension"),
        (lambda i: i.extension_numbers("t.None"), "all_extension_numbers_of_type"),
        (lambda i: i.extension_numbers("t.ext.Size"), "all_extension_numbers_of_type"),
    ],
)
def test_what_is_not_served_is_not_found(index: DescriptorIndex, lookup, field: str) -> None:
    with pytest.raises(NotFound) as info:
        lookup(index)
    assert info.value.field == field


def test_a_listed_service_must_be_declared() -> None:
    """A name that reflection could not describe is a start-up error, not a silent gap."""
    with pytest.raises(ValueError, match=r"^service_names: expected .*\['no.Such'\]$"):
        reflection_services([MAILER, "no.Such"], [mailer_pb2.DESCRIPTOR])
    with pytest.raises(ValueError, match=r"\['trio_mailer.v1.MsgRequest'\]$"):
        reflection_services(["trio_mailer.v1.MsgRequest"], [mailer_pb2.DESCRIPTOR])


def test_the_reflection_services_list_and_describe_themselves() -> None:
    index = DescriptorIndex.build(
        [MAILER, MAILER, *SERVICE_NAMES], [mailer_pb2.DESCRIPTOR, *FILE_DESCRIPTORS]
    )
    assert index.service_names == (
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        MAILER,
    )
    assert names(index.file_containing_symbol("grpc.reflection.v1.ServerReflection")) == [
        "trio_mailer/grpc_std/reflection/v1/reflection.proto"
    ]


@pytest.mark.parametrize("pb2", [v1_pb2, v1alpha_pb2], ids=["v1", "v1alpha"])
def test_answers_echo_the_request_and_carry_errors(index: DescriptorIndex, pb2) -> None:
    request = pb2.ServerReflectionRequest(host="h", file_containing_symbol="t.None")
    response = answer(index, pb2, request)
    assert response.original_request == request
    assert response.valid_host == "h"
    assert response.error_response.error_code == 5  # NOT_FOUND
    assert response.error_response.error_message == "file_containing_symbol: not found: 't.None'"

    empty = answer(index, pb2, pb2.ServerReflectionRequest())
    assert empty.error_response.error_code == 3  # INVALID_ARGUMENT
    assert empty.error_response.error_message.startswith("message_request: expected one of")

    listed = answer(index, pb2, pb2.ServerReflectionRequest(list_services="*"))
    assert [s.name for s in listed.list_services_response.service] == ["t.ext.Svc"]

    numbers = answer(
        index, pb2, pb2.ServerReflectionRequest(all_extension_numbers_of_type="t.Base")
    )
    assert numbers.all_extension_numbers_response.base_type_name == "t.Base"
    assert list(numbers.all_extension_numbers_response.extension_number) == [100, 101]

    extension = pb2.ExtensionRequest(containing_type="t.Base", extension_number=100)
    found = answer(index, pb2, pb2.ServerReflectionRequest(file_containing_extension=extension))
    assert names(tuple(found.file_descriptor_response.file_descriptor_proto)) == [
        "t/ext.proto",
        "t/base.proto",
    ]


def test_every_answer_fits_in_one_grpc_message() -> None:
    """purerpc applies the server's message limit to what it sends too: a bigger answer would
    fail with INTERNAL. Importing a large file (descriptor.proto is ~10 KiB) would trip this."""
    index = DescriptorIndex.build(
        [MAILER, health.SERVICE_NAME, *SERVICE_NAMES],
        [mailer_pb2.DESCRIPTOR, health.FILE_DESCRIPTOR, *FILE_DESCRIPTORS],
    )
    request = v1alpha_pb2.ServerReflectionRequest(host="a-host.example.com:20100")
    sizes = {}
    for name in index.files:
        request.file_by_filename = name
        sizes[name] = answer(index, v1alpha_pb2, request).ByteSize()
    assert max(sizes.values()) < MAX_MESSAGE_BYTES, sizes


# ---- the services, against grpcio-reflection's client (in a subprocess) ----

STREAM_ANSWERS = [
    {
        "kind": "list_services_response",
        "original_request": "list_services",
        "services": [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            MAILER,
        ],
    },
    {
        "kind": "file_descriptor_response",
        "original_request": "file_containing_symbol",
        "files": ["trio_mailer/v1/mailer.proto", "google/protobuf/timestamp.proto"],
    },
    {
        "kind": "file_descriptor_response",
        "original_request": "file_containing_symbol",
        "files": ["trio_mailer/v1/mailer.proto", "google/protobuf/timestamp.proto"],
    },
    {
        "kind": "file_descriptor_response",
        "original_request": "file_containing_symbol",
        "files": ["trio_mailer/grpc_std/health/v1/health.proto"],
    },
    {
        "kind": "file_descriptor_response",
        "original_request": "file_containing_symbol",
        "files": ["trio_mailer/grpc_std/health/v1/health.proto"],
    },
    {
        "kind": "error_response",
        "original_request": "file_containing_symbol",
        "code": 5,
        "message": "file_containing_symbol: not found: 'no.such.Service'",
    },
    {
        "kind": "file_descriptor_response",
        "original_request": "file_by_filename",
        "files": ["trio_mailer/v1/mailer.proto", "google/protobuf/timestamp.proto"],
    },
    {
        "kind": "error_response",
        "original_request": "file_by_filename",
        "code": 5,
        "message": "file_by_filename: not found: 'no/such.proto'",
    },
    {
        "kind": "all_extension_numbers_response",
        "original_request": "all_extension_numbers_of_type",
        "base_type_name": "trio_mailer.v1.MsgRequest",
        "numbers": [],
    },
    {
        "kind": "error_response",
        "original_request": "all_extension_numbers_of_type",
        "code": 5,
        "message": "all_extension_numbers_of_type: not found: 'no.such.Message'",
    },
    {
        "kind": "error_response",
        "original_request": "file_containing_extension",
        "code": 5,
        "message": "file_containing_extension: not found: 'trio_mailer.v1.MsgRequest 100'",
    },
    {
        "kind": "error_response",
        "original_request": None,
        "code": 3,
        "message": (
            "message_request: expected one of file_by_filename, file_containing_symbol, "
            "file_containing_extension, all_extension_numbers_of_type, list_services; got none"
        ),
    },
]


@pytest.fixture
async def reflected() -> dict:
    """What the stock client learnt from our server, in one subprocess run."""
    with trio.fail_after(30):
        async with open_std_server(HealthState([MAILER])) as port:
            [result] = await run_client(str(port), "reflect")
    return result


async def test_list_services_names_exactly_what_is_served(reflected: dict) -> None:
    assert reflected["services"] == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        MAILER,
    ]


async def test_the_stock_client_finds_send_pass_and_its_types(reflected: dict) -> None:
    """ProtoReflectionDescriptorDatabase feeds a DescriptorPool that resolves the Mailer."""
    assert reflected["send_pass_input"] == "trio_mailer.v1.MsgRequest"
    assert reflected["send_pass_output"] == "trio_mailer.v1.MsgReply"
    assert reflected["watch_server_streaming"] is True


async def test_an_unknown_symbol_is_not_found_for_the_stock_client(reflected: dict) -> None:
    """The database turns our NOT_FOUND error_response into KeyError (it asserts the code)."""
    assert reflected["unknown_symbol_is_key_error"] is True


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
async def test_one_stream_answers_every_request_in_order(reflected: dict, version: str) -> None:
    """Twelve requests on one ServerReflectionInfo stream: twelve answers, errors included."""
    assert reflected[version] == STREAM_ANSWERS


async def test_the_host_is_echoed_as_valid_host(reflected: dict) -> None:
    assert reflected["valid_host"] == "example"


async def test_our_reflection_protos_match_the_stock_one() -> None:
    """v1alpha is grpcio-reflection's file; v1 the same messages in package grpc.reflection.v1."""
    with trio.fail_after(30):
        [stock] = await run_client("descriptors")
    theirs = descriptor_pb2.FileDescriptorProto.FromString(
        base64.b64decode(stock["reflection_v1alpha"])
    )
    ours = descriptor_pb2.FileDescriptorProto.FromString(v1alpha_pb2.DESCRIPTOR.serialized_pb)
    ours.ClearField("name")
    theirs.ClearField("name")
    assert ours == theirs

    v1 = descriptor_pb2.FileDescriptorProto.FromString(v1_pb2.DESCRIPTOR.serialized_pb)
    assert v1.package == "grpc.reflection.v1"
    renamed = text_format.Parse(
        str(theirs).replace("grpc.reflection.v1alpha", "grpc.reflection.v1"),
        descriptor_pb2.FileDescriptorProto(),
    )
    assert v1.message_type == renamed.message_type
    assert v1.service == renamed.service
