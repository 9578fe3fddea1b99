"""A TF graph as nodes: what the GraphDef and TF.js readers produce, the rewrites change and the interpreter runs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class GraphNode:
    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


def clean_input(name: str) -> str | None:
    """The node an input reads (``name:0`` -> ``name``); ``None`` for a control dependency (no data flows)."""
    if name.startswith("^"):
        return None
    return re.sub(r":0$", "", name)


def data_inputs(node: GraphNode) -> list[str]:
    return [c for i in node.inputs if (c := clean_input(i))]


def const_value(nodes: Mapping[str, GraphNode], name: str) -> np.ndarray | None:
    """The value of the constant ``name`` (followed through Identity nodes: weights sometimes pass through one);
    ``None`` if it is not a constant."""
    node = nodes.get(name)
    while node is not None and node.op == "Identity":
        node = nodes.get(clean_input(node.inputs[0]) or "")
    return np.asarray(node.attrs["value"]) if node is not None and node.op == "Const" else None
