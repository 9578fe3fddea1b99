"""Read TensorFlow GraphDef files without TensorFlow.

GraphDef, NodeDef, AttrValue and TensorProto are plain protobuf messages. We declare the subset of fields a frozen
inference graph uses (field numbers from tensorflow/core/framework/*.proto) and let the ``protobuf`` runtime parse.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED

# TensorFlow DataType enum values -> numpy dtypes (the ones frozen face models use).
TF_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("float32"),
    2: np.dtype("float64"),
    3: np.dtype("int32"),
    4: np.dtype("uint8"),
    6: np.dtype("int8"),
    9: np.dtype("int64"),
    10: np.dtype("bool"),
    19: np.dtype("float16"),
}

# message name -> [(field, number, type, label, message type)]
_MESSAGES: dict[str, list[tuple[str, int, int, int, str | None]]] = {
    "Dim": [("size", 1, _F.TYPE_INT64, _OPT, None)],
    "Shape": [("dim", 2, _F.TYPE_MESSAGE, _REP, "Dim"), ("unknown_rank", 3, _F.TYPE_BOOL, _OPT, None)],
    "Tensor": [
        ("dtype", 1, _F.TYPE_INT32, _OPT, None),
        ("tensor_shape", 2, _F.TYPE_MESSAGE, _OPT, "Shape"),
        ("tensor_content", 4, _F.TYPE_BYTES, _OPT, None),
        ("float_val", 5, _F.TYPE_FLOAT, _REP, None),
        ("double_val", 6, _F.TYPE_DOUBLE, _REP, None),
        ("int_val", 7, _F.TYPE_INT32, _REP, None),
        ("int64_val", 10, _F.TYPE_INT64, _REP, None),
        ("bool_val", 11, _F.TYPE_BOOL, _REP, None),
    ],
    "ListValue": [
        ("s", 2, _F.TYPE_BYTES, _REP, None),
        ("i", 3, _F.TYPE_INT64, _REP, None),
        ("f", 4, _F.TYPE_FLOAT, _REP, None),
        ("b", 5, _F.TYPE_BOOL, _REP, None),
        ("type", 6, _F.TYPE_INT32, _REP, None),
    ],
    "AttrValue": [
        ("list", 1, _F.TYPE_MESSAGE, _OPT, "ListValue"),
        ("s", 2, _F.TYPE_BYTES, _OPT, None),
        ("i", 3, _F.TYPE_INT64, _OPT, None),
        ("f", 4, _F.TYPE_FLOAT, _OPT, None),
        ("b", 5, _F.TYPE_BOOL, _OPT, None),
        ("type", 6, _F.TYPE_INT32, _OPT, None),
        ("shape", 7, _F.TYPE_MESSAGE, _OPT, "Shape"),
        ("tensor", 8, _F.TYPE_MESSAGE, _OPT, "Tensor"),
    ],
    "Node": [
        ("name", 1, _F.TYPE_STRING, _OPT, None),
        ("op", 2, _F.TYPE_STRING, _OPT, None),
        ("input", 3, _F.TYPE_STRING, _REP, None),
        ("attr", 5, _F.TYPE_MESSAGE, _REP, "Node.AttrEntry"),
    ],
    "Graph": [("node", 1, _F.TYPE_MESSAGE, _REP, "Node")],
}


@cache
def _graph_class() -> type:
    file = descriptor_pb2.FileDescriptorProto(name="redteam_tf_graph.proto", package="redteam_tf", syntax="proto2")
    for name, fields in _MESSAGES.items():
        message = file.message_type.add(name=name)
        for field, number, kind, label, type_name in fields:
            entry = message.field.add(name=field, number=number, type=kind, label=label)
            if type_name:
                entry.type_name = f".redteam_tf.{type_name}"
        if name == "Node":  # map<string, AttrValue> attr
            attr_entry = message.nested_type.add(name="AttrEntry")
            attr_entry.options.map_entry = True
            attr_entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_OPT)
            attr_entry.field.add(
                name="value", number=2, type=_F.TYPE_MESSAGE, label=_OPT, type_name=".redteam_tf.AttrValue"
            )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("redteam_tf.Graph"))


def tensor_to_numpy(tensor: Any) -> np.ndarray:
    """Decode a TensorProto (raw ``tensor_content`` or the typed repeated fields, which may hold one value to splat)."""
    dtype = TF_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"unsupported TensorFlow dtype enum {tensor.dtype}")
    shape = tuple(d.size for d in tensor.tensor_shape.dim)
    if tensor.tensor_content:
        return np.frombuffer(tensor.tensor_content, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    values = (
        list(tensor.float_val)
        or list(tensor.double_val)
        or list(tensor.int_val)
        or list(tensor.int64_val)
        or list(tensor.bool_val)
    )
    array = np.array(values, dtype=dtype)
    count = int(np.prod(shape)) if shape else 1
    if array.size == count:
        return array.reshape(shape)
    if array.size == 1:
        return np.full(shape, array[0], dtype=dtype)
    if array.size == 0:
        return np.zeros(shape, dtype=dtype)
    raise ValueError(f"tensor with {array.size} values cannot fill shape {shape}")


def _attr_value(value: Any) -> Any:
    fields = value.ListFields()  # proto2 semantics: exactly the field that was written, zeros included
    kind = fields[0][0].name if fields else None
    if kind == "tensor":
        return tensor_to_numpy(value.tensor)
    if kind == "list":
        lst = value.list
        for field in ("i", "f", "s", "b", "type"):
            items = list(getattr(lst, field))
            if items:
                return [x.decode() if isinstance(x, bytes) else x for x in items]
        return []
    if kind == "s":
        return value.s.decode()
    if kind == "shape":
        return [d.size for d in value.shape.dim]
    if kind in ("i", "f", "b", "type"):
        return getattr(value, kind)
    return None


def parse_graphdef(data: bytes) -> list[tuple[str, str, list[str], dict[str, Any]]]:
    """Parse a serialized GraphDef into (name, op, inputs, attrs) tuples with attrs decoded to Python/numpy."""
    graph = _graph_class()()
    graph.ParseFromString(data)
    return [
        (node.name, node.op, list(node.input), {key: _attr_value(val) for key, val in node.attr.items()})
        for node in graph.node
    ]
