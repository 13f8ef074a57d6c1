"""Protobuf answers as Triton's HTTP JSON: field names as in the .proto, enums by name, and 64-bit
integers as JSON numbers (protobuf's JSON mapping writes them as strings; Triton, and clients
such as perf_analyzer that read `dims` or `max_batch_size` as numbers, do not)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

_INT64 = frozenset({FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64,
                    FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED64,
                    FieldDescriptor.TYPE_SFIXED64})


def _ints(value: Any) -> Any:
  return [int(v) for v in value] if isinstance(value, list) else int(value)


def _fix(desc: Descriptor, obj: dict) -> None:
  """Turns the 64-bit integer strings of `obj` (a message of type `desc`) into numbers."""
  for field in desc.fields:
    value = obj.get(field.name)
    if value is None:
      continue
    sub = field.message_type
    if sub is None:
      if field.type in _INT64:
        obj[field.name] = _ints(value)
    elif sub.GetOptions().map_entry:
      vfield = sub.fields_by_name["value"]
      for key, item in value.items():
        if vfield.message_type is not None:
          _fix(vfield.message_type, item)
        elif vfield.type in _INT64:
          value[key] = int(item)
    else:
      for item in value if isinstance(value, list) else (value,):
        _fix(sub, item)


def to_json(message: Message, *, defaults: bool = False) -> dict:
  """`message` as Triton's HTTP API writes it; `defaults`: with fields left at their default
  (as Triton writes a model configuration)."""
  obj = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                  always_print_fields_with_no_presence=defaults)
  _fix(message.DESCRIPTOR, obj)
  return obj
