"""TensorFlow's GraphDef messages, described here so that no TensorFlow install is needed.

Only the messages a frozen graph uses are described: ``GraphDef``, ``NodeDef``,
``AttrValue`` (with ``ListValue`` and ``NameAttrList``), ``TensorProto``,
``TensorShapeProto`` (with ``Dim``), ``VersionDef`` and the ``DataType`` enum.
Field numbers and types are those of ``tensorflow/core/framework/*.proto``
(proto3), so files that TensorFlow wrote parse unchanged. Fields left out here
(``GraphDef.library``, ``NodeDef.experimental_debug_info``, resource handles,
...) are kept by the protobuf runtime as unknown fields and never read.

The descriptors live in a private :class:`DescriptorPool`: a process that also
imports the real TensorFlow protos (package ``tensorflow``) sees no clash.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F = descriptor_pb2.FieldDescriptorProto

# DataType values we name; anything else still parses (proto3 enums are open).
DATA_TYPES: dict[str, int] = {
    "DT_INVALID": 0,
    "DT_FLOAT": 1,
    "DT_DOUBLE": 2,
    "DT_INT32": 3,
    "DT_UINT8": 4,
    "DT_INT16": 5,
    "DT_INT8": 6,
    "DT_STRING": 7,
    "DT_COMPLEX64": 8,
    "DT_INT64": 9,
    "DT_BOOL": 10,
    "DT_QINT8": 11,
    "DT_QUINT8": 12,
    "DT_QINT32": 13,
    "DT_BFLOAT16": 14,
    "DT_QINT16": 15,
    "DT_QUINT16": 16,
    "DT_UINT16": 17,
    "DT_COMPLEX128": 18,
    "DT_HALF": 19,
    "DT_RESOURCE": 20,
    "DT_VARIANT": 21,
    "DT_UINT32": 22,
    "DT_UINT64": 23,
}
DT_FLOAT = DATA_TYPES["DT_FLOAT"]
DT_DOUBLE = DATA_TYPES["DT_DOUBLE"]
DT_INT32 = DATA_TYPES["DT_INT32"]
DT_UINT8 = DATA_TYPES["DT_UINT8"]
DT_INT16 = DATA_TYPES["DT_INT16"]
DT_INT8 = DATA_TYPES["DT_INT8"]
DT_STRING = DATA_TYPES["DT_STRING"]
DT_INT64 = DATA_TYPES["DT_INT64"]
DT_BOOL = DATA_TYPES["DT_BOOL"]
DT_BFLOAT16 = DATA_TYPES["DT_BFLOAT16"]
DT_HALF = DATA_TYPES["DT_HALF"]
REF_OFFSET = 100  # DT_FLOAT_REF = 101 ...: variables' ref types in old graphs


def _field(
    msg: descriptor_pb2.DescriptorProto,
    name: str,
    number: int,
    ftype: int,
    *,
    repeated: bool = False,
    type_name: str = "",
    oneof: int | None = None,
) -> None:
    f = msg.field.add()
    f.name = name
    f.number = number
    f.type = ftype
    f.label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
    if type_name:
        f.type_name = type_name
    if oneof is not None:
        f.oneof_index = oneof


def _map_entry(msg: descriptor_pb2.DescriptorProto, entry: str, value_type: str) -> None:
    """A ``map<string, value_type>`` is a repeated nested ``*Entry`` message (key=1, value=2)."""
    e = msg.nested_type.add()
    e.name = entry
    e.options.map_entry = True
    _field(e, "key", 1, F.TYPE_STRING)
    _field(e, "value", 2, F.TYPE_MESSAGE, type_name=value_type)


def _file_proto() -> descriptor_pb2.FileDescriptorProto:
    fp = descriptor_pb2.FileDescriptorProto()
    fp.name = "aiop/tensorflow_graphdef.proto"
    fp.package = "tensorflow"
    fp.syntax = "proto3"

    dt = fp.enum_type.add()
    dt.name = "DataType"
    for name, number in DATA_TYPES.items():
        v = dt.value.add()
        v.name, v.number = name, number
    for name, number in list(DATA_TYPES.items())[1:20]:
        v = dt.value.add()
        v.name, v.number = f"{name}_REF", number + REF_OFFSET

    shape = fp.message_type.add()
    shape.name = "TensorShapeProto"
    dim = shape.nested_type.add()
    dim.name = "Dim"
    _field(dim, "size", 1, F.TYPE_INT64)
    _field(dim, "name", 2, F.TYPE_STRING)
    _field(
        shape, "dim", 2, F.TYPE_MESSAGE, repeated=True, type_name=".tensorflow.TensorShapeProto.Dim"
    )
    _field(shape, "unknown_rank", 3, F.TYPE_BOOL)

    tensor = fp.message_type.add()
    tensor.name = "TensorProto"
    _field(tensor, "dtype", 1, F.TYPE_ENUM, type_name=".tensorflow.DataType")
    _field(tensor, "tensor_shape", 2, F.TYPE_MESSAGE, type_name=".tensorflow.TensorShapeProto")
    _field(tensor, "version_number", 3, F.TYPE_INT32)
    _field(tensor, "tensor_content", 4, F.TYPE_BYTES)
    _field(tensor, "float_val", 5, F.TYPE_FLOAT, repeated=True)
    _field(tensor, "double_val", 6, F.TYPE_DOUBLE, repeated=True)
    _field(tensor, "int_val", 7, F.TYPE_INT32, repeated=True)
    _field(tensor, "string_val", 8, F.TYPE_BYTES, repeated=True)
    _field(tensor, "scomplex_val", 9, F.TYPE_FLOAT, repeated=True)
    _field(tensor, "int64_val", 10, F.TYPE_INT64, repeated=True)
    _field(tensor, "bool_val", 11, F.TYPE_BOOL, repeated=True)
    _field(tensor, "dcomplex_val", 12, F.TYPE_DOUBLE, repeated=True)
    _field(tensor, "half_val", 13, F.TYPE_INT32, repeated=True)
    _field(tensor, "uint32_val", 16, F.TYPE_UINT32, repeated=True)
    _field(tensor, "uint64_val", 17, F.TYPE_UINT64, repeated=True)

    attr = fp.message_type.add()
    attr.name = "AttrValue"
    lv = attr.nested_type.add()
    lv.name = "ListValue"
    _field(lv, "s", 2, F.TYPE_BYTES, repeated=True)
    _field(lv, "i", 3, F.TYPE_INT64, repeated=True)
    _field(lv, "f", 4, F.TYPE_FLOAT, repeated=True)
    _field(lv, "b", 5, F.TYPE_BOOL, repeated=True)
    _field(lv, "type", 6, F.TYPE_ENUM, repeated=True, type_name=".tensorflow.DataType")
    _field(lv, "shape", 7, F.TYPE_MESSAGE, repeated=True, type_name=".tensorflow.TensorShapeProto")
    _field(lv, "tensor", 8, F.TYPE_MESSAGE, repeated=True, type_name=".tensorflow.TensorProto")
    _field(lv, "func", 9, F.TYPE_MESSAGE, repeated=True, type_name=".tensorflow.NameAttrList")
    attr.oneof_decl.add().name = "value"
    _field(attr, "list", 1, F.TYPE_MESSAGE, type_name=".tensorflow.AttrValue.ListValue", oneof=0)
    _field(attr, "s", 2, F.TYPE_BYTES, oneof=0)
    _field(attr, "i", 3, F.TYPE_INT64, oneof=0)
    _field(attr, "f", 4, F.TYPE_FLOAT, oneof=0)
    _field(attr, "b", 5, F.TYPE_BOOL, oneof=0)
    _field(attr, "type", 6, F.TYPE_ENUM, type_name=".tensorflow.DataType", oneof=0)
    _field(attr, "shape", 7, F.TYPE_MESSAGE, type_name=".tensorflow.TensorShapeProto", oneof=0)
    _field(attr, "tensor", 8, F.TYPE_MESSAGE, type_name=".tensorflow.TensorProto", oneof=0)
    _field(attr, "placeholder", 9, F.TYPE_STRING, oneof=0)
    _field(attr, "func", 10, F.TYPE_MESSAGE, type_name=".tensorflow.NameAttrList", oneof=0)

    nal = fp.message_type.add()
    nal.name = "NameAttrList"
    _field(nal, "name", 1, F.TYPE_STRING)
    _map_entry(nal, "AttrEntry", ".tensorflow.AttrValue")
    _field(
        nal,
        "attr",
        2,
        F.TYPE_MESSAGE,
        repeated=True,
        type_name=".tensorflow.NameAttrList.AttrEntry",
    )

    node = fp.message_type.add()
    node.name = "NodeDef"
    _field(node, "name", 1, F.TYPE_STRING)
    _field(node, "op", 2, F.TYPE_STRING)
    _field(node, "input", 3, F.TYPE_STRING, repeated=True)
    _field(node, "device", 4, F.TYPE_STRING)
    _map_entry(node, "AttrEntry", ".tensorflow.AttrValue")
    _field(
        node, "attr", 5, F.TYPE_MESSAGE, repeated=True, type_name=".tensorflow.NodeDef.AttrEntry"
    )

    ver = fp.message_type.add()
    ver.name = "VersionDef"
    _field(ver, "producer", 1, F.TYPE_INT32)
    _field(ver, "min_consumer", 2, F.TYPE_INT32)
    _field(ver, "bad_consumers", 3, F.TYPE_INT32, repeated=True)

    graph = fp.message_type.add()
    graph.name = "GraphDef"
    _field(graph, "node", 1, F.TYPE_MESSAGE, repeated=True, type_name=".tensorflow.NodeDef")
    _field(graph, "version", 3, F.TYPE_INT32)  # deprecated, still in old files
    _field(graph, "versions", 4, F.TYPE_MESSAGE, type_name=".tensorflow.VersionDef")
    return fp


_POOL = descriptor_pool.DescriptorPool()
_FILE = _POOL.Add(_file_proto())


def _cls(name: str) -> type:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"tensorflow.{name}"))


GraphDef = _cls("GraphDef")
NodeDef = _cls("NodeDef")
AttrValue = _cls("AttrValue")
NameAttrList = _cls("NameAttrList")
TensorProto = _cls("TensorProto")
TensorShapeProto = _cls("TensorShapeProto")
VersionDef = _cls("VersionDef")

__all__ = [
    "DATA_TYPES",
    "AttrValue",
    "GraphDef",
    "NameAttrList",
    "NodeDef",
    "TensorProto",
    "TensorShapeProto",
    "VersionDef",
]
