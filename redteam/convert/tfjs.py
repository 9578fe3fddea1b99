"""Read TensorFlow.js models without TensorFlow.

Two formats share one weight encoding:

- a GRAPH model: ``model.json`` holds the GraphDef as JSON (``modelTopology.node``) plus a ``weightsManifest``;
  :func:`load_tfjs_graph` turns it into a :class:`~redteam.convert.tf_graph.TFGraphModule`;
- a weights manifest alone (``*-weights_manifest.json``, as face-api ships: the architecture lives in JavaScript);
  :func:`load_tfjs_weights` returns its named tensors and the network is written by hand.

A manifest is a list of groups ``{"paths": [shard, ...], "weights": [spec, ...]}``: a group's shards are concatenated
and its specs consume the bytes in order. A spec may be quantised: ``uint8``/``uint16`` values mapped back by
``q * scale + min`` (rounded for int32 weights), or ``float16`` values widened to float32, as tfjs's decoder does.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from redteam.assets import RegistryFile
from redteam.convert.graph import UnsupportedModelError
from redteam.convert.tf_graph import GraphNode, TFGraphModule, load_converted

_STORED: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "int32": np.dtype("<i4"), "bool": np.dtype("u1")}
_QUANTISED: dict[str, np.dtype] = {"uint8": np.dtype("u1"), "uint16": np.dtype("<u2"), "float16": np.dtype("<f2")}
_RESULT = {"float32": np.dtype("float32"), "int32": np.dtype("int32"), "bool": np.dtype("bool")}

# TensorFlow DataType names (as GraphDef JSON spells them) -> enum values, as the protobuf reader gives them.
_TF_TYPES = {"DT_FLOAT": 1, "DT_DOUBLE": 2, "DT_INT32": 3, "DT_UINT8": 4, "DT_INT8": 6, "DT_INT64": 9, "DT_BOOL": 10}


@dataclass(frozen=True)
class TFJSModel:
    """A TF.js model inside a registry package: its JSON (``model.json`` or a weights manifest) and weight shards."""

    json_file: RegistryFile
    shards: tuple[RegistryFile, ...]

    @property
    def files(self) -> tuple[RegistryFile, ...]:
        return (self.json_file, *self.shards)

    def read(self) -> tuple[Any, dict[str, bytes]]:
        """The parsed JSON and the shard bytes by the file name the manifest uses."""
        return json.loads(self.json_file.path().read_text()), {
            Path(s.member).name: s.path().read_bytes() for s in self.shards
        }


def _decode(spec: dict[str, Any], data: memoryview) -> tuple[np.ndarray, int]:
    """One weight from the start of ``data`` -> (array in its declared dtype, bytes consumed)."""
    dtype, shape = spec["dtype"], [int(s) for s in spec["shape"]]
    count = int(np.prod(shape)) if shape else 1
    quantisation = spec.get("quantization")
    if dtype not in _RESULT:
        raise UnsupportedModelError(f"TF.js weight {spec['name']!r}: dtype {dtype}")
    stored = _QUANTISED[quantisation["dtype"]] if quantisation else _STORED[dtype]
    size = count * stored.itemsize
    if len(data) < size:
        raise ValueError(f"TF.js weight {spec['name']!r} runs past the end of its shards")
    values = np.frombuffer(data[:size], dtype=stored)
    if quantisation and quantisation["dtype"] != "float16":
        # Affine uint8/uint16 quantisation: computed in double, stored as float32 (or rounded half up for int32).
        values = values.astype(np.float64) * quantisation["scale"] + quantisation["min"]
        if dtype == "int32":
            values = np.floor(values + 0.5)
    return values.astype(_RESULT[dtype]).reshape(shape), size


def read_weights(manifest: list[dict[str, Any]], shards: Mapping[str, bytes]) -> dict[str, np.ndarray]:
    """Decode every weight of a TF.js weights manifest.

    Args:
        manifest: the groups of a ``weightsManifest`` (or of a ``*-weights_manifest.json`` file).
        shards: shard bytes by the file name the manifest lists (its ``paths``, compared by base name).
    Returns:
        name -> array (float32, int32 or bool), dequantised.
    """
    weights: dict[str, np.ndarray] = {}
    for group in manifest:
        missing = [p for p in group["paths"] if Path(p).name not in shards]
        if missing:
            raise ValueError(f"TF.js weight shards missing: {', '.join(missing)}")
        data = memoryview(b"".join(shards[Path(p).name] for p in group["paths"]))  # slices without copying
        offset = 0
        for spec in group["weights"]:
            weights[spec["name"]], size = _decode(spec, data[offset:])
            offset += size
        if offset != len(data):
            raise ValueError(f"TF.js shards {group['paths']} hold {len(data) - offset} bytes no weight describes")
    return weights


def _json_attr(value: dict[str, Any]) -> Any:
    """A GraphDef-JSON AttrValue -> the Python value the protobuf reader would give."""
    if "list" in value:
        for kind, items in value["list"].items():
            if items:
                return [_json_scalar(kind, item) for item in items]
        return []
    if "shape" in value:
        return [int(d.get("size", -1)) for d in value["shape"].get("dim", [])]
    for kind in ("s", "i", "f", "b", "type"):
        if kind in value:
            return _json_scalar(kind, value[kind])
    return None  # tensors come from the weights; functions and placeholders are not used by inference rules


def _json_scalar(kind: str, item: Any) -> Any:
    if kind == "s":
        return base64.b64decode(item).decode()
    if kind == "i":
        return int(item)
    if kind == "f":
        return float(item)
    if kind == "type":
        return _TF_TYPES.get(item, item)
    return item


def nodes_from_model_json(model: dict[str, Any], shards: Mapping[str, bytes]) -> list[GraphNode]:
    """Nodes of a TF.js graph model (``model.json`` parsed) with constants filled in from its weight shards."""
    if model.get("format", "graph-model") != "graph-model" or "node" not in model.get("modelTopology", {}):
        raise ValueError("not a TF.js graph model (a layers model or a bare weights manifest?)")
    weights = read_weights(model["weightsManifest"], shards)
    nodes = []
    for node in model["modelTopology"]["node"]:
        attrs = {key: _json_attr(value) for key, value in node.get("attr", {}).items()}
        if node["op"] == "Const":
            if node["name"] not in weights:
                raise ValueError(f"TF.js constant {node['name']!r} has no weight in the manifest")
            attrs["value"] = weights[node["name"]]
        nodes.append(GraphNode(node["name"], node["op"], list(node.get("input", [])), attrs))
    return nodes


def load_tfjs_graph(model: TFJSModel, inputs: list[str], outputs: list[str]) -> TFGraphModule:
    """A TF.js graph model as a module, converted once (cached by its files' checksums)."""
    key = hashlib.sha256("".join(f.sha256 for f in model.files).encode()).hexdigest()[:16]
    return load_converted(f"tfjs-{key}", lambda: nodes_from_model_json(*model.read()), inputs, outputs)


def load_tfjs_weights(model: TFJSModel) -> dict[str, np.ndarray]:
    """The named tensors of a weights manifest and its shards (face-api's ``*-weights_manifest.json`` + ``.bin``)."""
    manifest, shards = model.read()
    return read_weights(manifest, shards)
