"""A converted network's forward pass on onnxruntime, for passes that need no gradient.

Query attacks and their judge only run forward passes. On a CPU onnxruntime runs our own export of most zoo
recognisers 1.4-2.5x faster than eager PyTorch (its convolutions fuse their activations and use blocked layouts;
arcface is the exception: bench/targets.py), and the published ONNX detectors (retinaface, scrfd) 1.5-1.9x faster
than their conversion, so a score or decision oracle may answer from it (``redteam run --forward onnxruntime``).
Recognisers run their export by PyTorch's own (TorchScript-based) exporter; detectors run the file they were
converted from. Parity with the torch module is tested on real faces (tests/test_onnx_forward.py).
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from redteam.errors import RedteamError


def export_onnx(net: nn.Module, example: Tensor) -> bytes:
    """``net`` as an ONNX model taking ``x`` (batch axis free) -> its outputs, traced on ``example``."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the tracer's notes about constants it bakes in: the graphs are static
        warnings.simplefilter("ignore")
        export: Any = torch.onnx.export  # writes to a file object too; its annotation only names paths
        export(net, (example,), buffer, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return buffer.getvalue()


def onnx_session(model: bytes | str):
    """An onnxruntime CPU session on a model's bytes or path (its own log noise silenced)."""
    try:
        import onnxruntime
    except ImportError:
        raise RedteamError("onnxruntime is not installed: pip install onnxruntime") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # its warnings (e.g. about unused initialisers) are not the user's business
    # Its threads wait for work without spinning, as torch's do (runtime.py): spinning, they held both cores of a
    # 2-core machine between a service's requests while its client waited for a core to encode the next query.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class OnnxRuntimeForward(nn.Module):
    """``net``'s forward pass answered by onnxruntime from ``model`` (its export, or the ONNX file it was converted
    from: bytes or a path). Outputs come back as float32 tensors on the input's device; there is no gradient to ask
    for.

    A model whose batch axis is fixed at 1 (InsightFace's SCRFD exports) answers a batch one image at a time; its
    outputs gain a leading batch axis where they have none, so every output is batch-first."""

    def __init__(self, model: bytes | str, net: nn.Module):
        super().__init__()
        self.session = onnx_session(model)
        self.exported = net  # kept: its parameters still say where the target lives
        given = self.session.get_inputs()[0]
        self.input_name, self.one_at_a_time = given.name, given.shape[0] == 1

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RedteamError("the onnxruntime forward pass has no gradients: it serves score and decision queries.")
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        if self.one_at_a_time:
            answers = [self.session.run(None, {self.input_name: image[None]}) for image in array]
            batched = [np.concatenate(parts) if parts[0].shape[0] == 1 else np.stack(parts) for parts in zip(*answers)]
        else:
            batched = self.session.run(None, {self.input_name: array})
        outputs = tuple(torch.from_numpy(o).to(x.device) for o in batched)
        return outputs[0] if len(outputs) == 1 else outputs
