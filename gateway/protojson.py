"""Protobuf messages as the JSON Triton's HTTP API returns (int64 as JSON numbers)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

_INT64_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def message_to_dict(message: Message) -> dict[str, Any]:
    """Like ``MessageToDict`` with field names kept, but 64-bit integers stay numbers."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _int64_to_numbers(data, message.DESCRIPTOR)
    return data


def _int64_to_numbers(data: dict[str, Any], descriptor: Descriptor) -> None:
    for name, value in data.items():
        fd = descriptor.fields_by_name.get(name)
        if fd is None:
            continue
        repeated = fd.label == FieldDescriptor.LABEL_REPEATED
        if fd.message_type is not None:
            if fd.message_type.GetOptions().map_entry:
                value_fd = fd.message_type.fields_by_name["value"]
                if value_fd.message_type is not None:
                    for item in value.values():
                        _int64_to_numbers(item, value_fd.message_type)
                elif value_fd.type in _INT64_TYPES:
                    data[name] = {k: int(v) for k, v in value.items()}
            elif repeated:
                for item in value:
                    _int64_to_numbers(item, fd.message_type)
            else:
                _int64_to_numbers(value, fd.message_type)
        elif fd.type in _INT64_TYPES:
            data[name] = [int(v) for v in value] if repeated else int(value)
