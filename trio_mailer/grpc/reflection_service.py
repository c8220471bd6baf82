"""gRPC server reflection: ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

Lets a generic client (grpcurl, grpcui, Postman, grpcio's ``ProtoReflectionDescriptorDatabase``)
list the services and fetch their ``.proto`` descriptors at run time. Both protocol versions
carry the same messages under different package names; each is served by the same code.

Only the files handed to ``reflection_services`` (and their imports, transitively) are
reflected, not everything in protobuf's default pool: the index is built once, at start-up,
and every answer is a dictionary look-up. Each request on the stream gets exactly one response,
in order; a request that cannot be answered gets an ``error_response`` (NOT_FOUND for an unknown
file, symbol, type or extension; INVALID_ARGUMENT for an empty request) and the stream goes on.
File answers carry the requested file first, then every file it imports, transitively.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from types import ModuleType
from typing import Any

import attrs
import purerpc
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor

from trio_mailer.grpc_std.reflection.v1 import reflection_grpc as v1_grpc
from trio_mailer.grpc_std.reflection.v1 import reflection_pb2 as v1_pb2
from trio_mailer.grpc_std.reflection.v1alpha import reflection_grpc as v1alpha_grpc
from trio_mailer.grpc_std.reflection.v1alpha import reflection_pb2 as v1alpha_pb2

SERVICE_NAMES = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")
FILE_DESCRIPTORS = (v1_pb2.DESCRIPTOR, v1alpha_pb2.DESCRIPTOR)

# gRPC status codes, as sent in ErrorResponse.error_code.
_INVALID_ARGUMENT = purerpc.StatusCode.INVALID_ARGUMENT.value
_NOT_FOUND = purerpc.StatusCode.NOT_FOUND.value
# How much of a requested name is echoed back in an error message.
_MAX_ECHOED_CHARS = 200


@attrs.frozen
class NotFound(Exception):
    """A reflection request named something that is not served: NOT_FOUND."""

    field: str
    value: str

    @property
    def message(self) -> str:
        # repr escapes any control character in what the client sent.
        return f"{self.field}: not found: {self.value[:_MAX_ECHOED_CHARS]!r}"


@attrs.define
class DescriptorIndex:
    """Files, symbols and extensions of a set of ``.proto`` files and their imports."""

    service_names: tuple[str, ...]
    files: dict[str, FileDescriptor] = attrs.Factory(dict)
    # The requested file's serialized FileDescriptorProto first, then its imports, transitively.
    file_answers: dict[str, tuple[bytes, ...]] = attrs.Factory(dict)
    symbols: dict[str, FileDescriptor] = attrs.Factory(dict)
    messages: set[str] = attrs.Factory(set)
    services: set[str] = attrs.Factory(set)
    extensions: dict[tuple[str, int], FileDescriptor] = attrs.Factory(dict)

    @classmethod
    def build(
        cls, service_names: Iterable[str], file_descriptors: Iterable[FileDescriptor]
    ) -> DescriptorIndex:
        """Index ``file_descriptors`` and everything they import.

        Raises:
            ValueError: a service name is not declared in any of the files.
        """
        index = cls(tuple(sorted(set(service_names))))
        for file in file_descriptors:
            index._add_file(file)
        for name in index.files:
            index.file_answers[name] = tuple(
                f.serialized_pb for f in _with_imports(index.files[name])
            )
        missing = [name for name in index.service_names if name not in index.services]
        if missing:
            raise ValueError(
                f"service_names: expected services declared in the file descriptors, got {missing}"
            )
        return index

    def _add_file(self, file: FileDescriptor) -> None:
        if file.name in self.files:
            return
        self.files[file.name] = file
        for dependency in file.dependencies:
            self._add_file(dependency)
        scope = file.package
        for message in file.message_types_by_name.values():
            self._add_message(file, message)
        for enum in file.enum_types_by_name.values():
            self._add_enum(file, enum, scope)
        for extension in file.extensions_by_name.values():
            self._add_extension(file, extension)
        for service in file.services_by_name.values():
            self.symbols.setdefault(service.full_name, file)
            self.services.add(service.full_name)
            for method in service.methods:
                self.symbols.setdefault(method.full_name, file)

    def _add_message(self, file: FileDescriptor, message: Descriptor) -> None:
        self.symbols.setdefault(message.full_name, file)
        self.messages.add(message.full_name)
        for field in message.fields:
            self.symbols.setdefault(field.full_name, file)
        for oneof in message.oneofs:
            self.symbols.setdefault(oneof.full_name, file)
        for nested in message.nested_types:
            self._add_message(file, nested)
        for enum in message.enum_types:
            self._add_enum(file, enum, message.full_name)
        for extension in message.extensions:
            self._add_extension(file, extension)

    def _add_enum(self, file: FileDescriptor, enum: EnumDescriptor, scope: str) -> None:
        self.symbols.setdefault(enum.full_name, file)
        # Enum values are siblings of their enum (C++ scoping): "pkg.Msg.VALUE".
        for value in enum.values:
            self.symbols.setdefault(f"{scope}.{value.name}" if scope else value.name, file)

    def _add_extension(self, file: FileDescriptor, extension: Any) -> None:
        self.symbols.setdefault(extension.full_name, file)
        key = (extension.containing_type.full_name, extension.number)
        self.extensions.setdefault(key, file)

    # ---- look-ups: each returns the answer or raises NotFound ----

    def file_by_filename(self, name: str) -> tuple[bytes, ...]:
        try:
            return self.file_answers[name]
        except KeyError:
            raise NotFound("file_by_filename", name) from None

    def file_containing_symbol(self, symbol: str) -> tuple[bytes, ...]:
        file = self.symbols.get(symbol)
        if file is None:
            raise NotFound("file_containing_symbol", symbol)
        return self.file_answers[file.name]

    def file_containing_extension(self, containing_type: str, number: int) -> tuple[bytes, ...]:
        file = self.extensions.get((containing_type, number))
        if file is None:
            raise NotFound("file_containing_extension", f"{containing_type} {number}")
        return self.file_answers[file.name]

    def extension_numbers(self, containing_type: str) -> list[int]:
        if containing_type not in self.messages:
            raise NotFound("all_extension_numbers_of_type", containing_type)
        return sorted(number for name, number in self.extensions if name == containing_type)


def _with_imports(file: FileDescriptor) -> list[FileDescriptor]:
    """``file``, then every file it imports, transitively, each once."""
    ordered: list[FileDescriptor] = []
    seen: set[str] = set()
    pending = [file]
    while pending:
        current = pending.pop()
        if current.name in seen:
            continue
        seen.add(current.name)
        ordered.append(current)
        pending.extend(reversed(current.dependencies))
    return ordered


def answer(index: DescriptorIndex, pb2: ModuleType, request: Any) -> Any:
    """The ``ServerReflectionResponse`` (of ``pb2``'s package) to one request."""
    response = pb2.ServerReflectionResponse(valid_host=request.host, original_request=request)
    kind = request.WhichOneof("message_request")
    try:
        if kind == "list_services":
            response.list_services_response.service.extend(
                pb2.ServiceResponse(name=name) for name in index.service_names
            )
        elif kind == "file_by_filename":
            files = index.file_by_filename(request.file_by_filename)
            response.file_descriptor_response.file_descriptor_proto.extend(files)
        elif kind == "file_containing_symbol":
            files = index.file_containing_symbol(request.file_containing_symbol)
            response.file_descriptor_response.file_descriptor_proto.extend(files)
        elif kind == "file_containing_extension":
            wanted = request.file_containing_extension
            files = index.file_containing_extension(wanted.containing_type, wanted.extension_number)
            response.file_descriptor_response.file_descriptor_proto.extend(files)
        elif kind == "all_extension_numbers_of_type":
            name = request.all_extension_numbers_of_type
            numbers = index.extension_numbers(name)
            response.all_extension_numbers_response.base_type_name = name
            response.all_extension_numbers_response.extension_number.extend(numbers)
        else:
            response.error_response.error_code = _INVALID_ARGUMENT
            response.error_response.error_message = (
                "message_request: expected one of file_by_filename, file_containing_symbol, "
                "file_containing_extension, all_extension_numbers_of_type, list_services; "
                "got none"
            )
    except NotFound as exc:
        response.error_response.error_code = _NOT_FOUND
        response.error_response.error_message = exc.message
    return response


class _Answering:
    """ServerReflectionInfo: one response per request, in order, until the client half-closes."""

    _pb2: ModuleType

    def __init__(self, index: DescriptorIndex) -> None:
        self._index = index

    async def ServerReflectionInfo(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            yield answer(self._index, self._pb2, request)


class _V1Reflection(_Answering, v1_grpc.ServerReflectionServicer):  # type: ignore[misc]
    _pb2 = v1_pb2


class _V1AlphaReflection(_Answering, v1alpha_grpc.ServerReflectionServicer):  # type: ignore[misc]
    _pb2 = v1alpha_pb2


def reflection_services(
    service_names: Iterable[str], file_descriptors: Iterable[FileDescriptor]
) -> list[purerpc.Service]:
    """The v1 and v1alpha reflection services, for ``serve_grpc``.

    They list ``service_names`` and themselves, and reflect ``file_descriptors`` (for example
    ``mailer_pb2.DESCRIPTOR``), their imports and the reflection protocol's own files.

    Raises:
        ValueError: a name in ``service_names`` is not declared in ``file_descriptors``.
    """
    index = DescriptorIndex.build(
        [*service_names, *SERVICE_NAMES], [*file_descriptors, *FILE_DESCRIPTORS]
    )
    return [_V1Reflection(index).service, _V1AlphaReflection(index).service]
