"""A recogniser's model file as a target, ``--target file:model.onnx`` (or ``file:model.tflite``, or
``file:model.yaml`` for a file with other input conventions), as a vendor's SDK would run it.

The file runs in its own runtime (onnxruntime for ONNX, LiteRT for TFLite): a score oracle. Where redteam's
converters convert it (:mod:`redteam.convert`), the target also offers gradients: the converted module computes the
embeddings white-box attacks differentiate, after a parity check against the runtime when the target loads (its
card states the figure; a file whose conversion disagrees with its runtime is offered as scores only). With
``--access scores`` or ``decisions`` the runtime answers every query.

Inputs follow InsightFace's convention unless a YAML says otherwise: faces warped onto its five-point template at the
112 x 112 size the file declares, RGB, ``(255 x - 127.5) / 128`` (raw pixels when the ONNX graph normalises its
input itself, as InsightFace's MXNet exports do). The YAML::

    model: vendor.onnx             # relative to the YAML
    crop: insightface              # or central:0.8 (a central square of that fraction of the LFW-framed image)
    channels: RGB                  # or BGR
    mean: [127.5, 127.5, 127.5]    # the input is (255 x - mean) / scale; null: raw pixels in [0, 255]
    scale: 128
    metric: cosine                 # or euclidean (an L2 distance decides)
    threshold: 0.36                # else `redteam calibrate --target file:... --data faces-train` stores one

The threshold of a file is unknown until it is calibrated: ``redteam calibrate`` keeps it for the file's content.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from redteam.api import TARGETS, Access, CentralCrop, FaceRecognizer, ModelCard, Preprocessing, TemplateWarp
from redteam.console import console
from redteam.convert.graph import UnsupportedModelError
from redteam.convert.onnx_forward import onnx_session
from redteam.convert.onnx_graph import load_onnx, normalises_its_input
from redteam.convert.tf_graph import load_converted
from redteam.convert.tflite import nodes_from_tflite, tflite_io_names
from redteam.errors import RedteamError

#: Conversion and runtime must agree this closely (relative to the embedding's size) for gradients to be offered.
PARITY_TOLERANCE = 1e-3
FORMATS = {".onnx": "onnxruntime", ".tflite": "LiteRT"}


@dataclass(frozen=True)
class ModelFileSpec:
    """A model file and how faces are fed to it (see the module docstring)."""

    model: Path
    crop: str = "insightface"
    channels: Literal["RGB", "BGR"] = "RGB"
    mean: tuple[float, float, float] | None = (127.5, 127.5, 127.5)
    scale: float = 128.0
    metric: Literal["cosine", "euclidean"] = "cosine"
    threshold: float | None = None
    source: Path | None = None  # the YAML it came from, if any

    @classmethod
    def load(cls, argument: str) -> ModelFileSpec:
        """``file:ARGUMENT``: a model file, or a YAML naming one; a one-line error for anything else."""
        path = Path(argument)
        if not path.is_file():
            raise RedteamError(f"file:{argument}: no such file.")
        if path.suffix.lower() in FORMATS:
            return cls(model=path)
        if path.suffix.lower() not in (".yaml", ".yml"):
            raise RedteamError(f"file:{argument}: give an .onnx or .tflite model, or a .yaml describing one.")
        try:
            raw = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise RedteamError(f"{path} is not YAML: {str(error).splitlines()[0]}") from None
        known = {f.name for f in dataclasses.fields(cls)} - {"source"}
        if not isinstance(raw, dict) or "model" not in raw or set(raw) - known:
            keys = ", ".join(sorted(known))
            raise RedteamError(f"{path}: a model file spec is a mapping with model: and any of {keys}.")
        model = path.parent / str(raw.pop("model"))
        if not model.is_file() or model.suffix.lower() not in FORMATS:
            raise RedteamError(f"{path}: model {model} is not an .onnx or .tflite file here.")
        mean = raw.pop("mean", cls.mean)
        spec = cls(model=model, source=path, mean=None if mean is None else tuple(mean), **raw)
        spec.crop_for((112, 112))  # a wrong crop is reported now, not at the first batch
        if spec.channels not in ("RGB", "BGR") or spec.metric not in ("cosine", "euclidean"):
            raise RedteamError(f"{path}: channels is RGB or BGR, metric cosine or euclidean.")
        return spec

    @property
    def runtime_name(self) -> str:
        return FORMATS[self.model.suffix.lower()]

    def crop_for(self, size: tuple[int, int]) -> CentralCrop | TemplateWarp:
        where = self.source or self.model
        if self.crop == "insightface":
            if size != (112, 112):
                raise RedteamError(
                    f"{where}: the model takes {size[0]}x{size[1]} faces and InsightFace's template is for 112x112: "
                    "say how faces are cropped for it in a YAML (crop: central:0.8)."
                )
            return TemplateWarp("insightface-112")
        kind, _, fraction = self.crop.partition(":")
        try:
            if kind == "central" and 0 < float(fraction) <= 1:
                return CentralCrop(float(fraction))
        except ValueError:
            pass
        raise RedteamError(f"{where}: crop is insightface or central:FRACTION (0 < FRACTION <= 1), not {self.crop!r}.")


class Runtime:
    """A model file in its own runtime: ``[B, 3, H, W]`` float32 network inputs -> ``[B, D]`` outputs."""

    name: str
    size: tuple[int, int]
    channels_last: bool
    fixed_batch: int | None  # a batch size baked into the file (then fed in chunks of it, the last one padded)

    def run(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.channels_last:
            batch = batch.transpose(0, 2, 3, 1)
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        size = self.fixed_batch
        if size is None:
            return self.run(batch).reshape(len(batch), -1)
        outputs = []
        for start in range(0, len(batch), size):
            chunk = batch[start : start + size]
            padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), np.float32)])
            outputs.append(self.run(padded).reshape(size, -1)[: len(chunk)])
        return np.concatenate(outputs)


def _image_layout(shape: list[Any], where: Path) -> tuple[tuple[int, int], bool]:
    """(size, channels last) of a ``[B, 3, H, W]`` or ``[B, H, W, 3]`` image input."""
    if len(shape) == 4 and shape[1] == 3 and isinstance(shape[2], int) and isinstance(shape[3], int):
        return (shape[2], shape[3]), False
    if len(shape) == 4 and shape[3] == 3 and isinstance(shape[1], int) and isinstance(shape[2], int):
        return (shape[1], shape[2]), True
    raise RedteamError(f"{where}: its input {shape} is not a batch of fixed-size 3-channel images.")


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, path: Path):
        try:
            self.session = onnx_session(str(path))
        except RedteamError:
            raise
        except Exception as error:  # onnxruntime raises its own exception types for a bad file
            raise RedteamError(f"{path}: onnxruntime cannot load it: {str(error).splitlines()[0][:200]}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(self.session.get_outputs()) != 1:
            raise RedteamError(f"{path}: a recogniser takes one image and gives one embedding; this model does not.")
        self.input = inputs[0].name
        self.size, self.channels_last = _image_layout(list(inputs[0].shape), path)
        self.fixed_batch = inputs[0].shape[0] if isinstance(inputs[0].shape[0], int) else None

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: batch})[0]


class LiteRtRuntime(Runtime):
    name = "LiteRT"

    def __init__(self, path: Path):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise RedteamError(f"{path} runs in LiteRT: pip install ai-edge-litert") from None
        try:
            self.interpreter = Interpreter(model_path=str(path))
        except (ValueError, RuntimeError) as error:
            raise RedteamError(f"{path}: LiteRT cannot load it: {str(error).splitlines()[0][:200]}") from None
        inputs = self.interpreter.get_input_details()
        if len(inputs) != 1 or len(self.interpreter.get_output_details()) != 1:
            raise RedteamError(f"{path}: a recogniser takes one image and gives one embedding; this model does not.")
        if inputs[0]["dtype"] != np.float32:
            kind = inputs[0]["dtype"].__name__
            raise RedteamError(f"{path}: its input is {kind}: quantised models are not supported.")
        self.input = inputs[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]
        self.size, self.channels_last = _image_layout([int(s) for s in inputs[0]["shape"]], path)
        batch = int(inputs[0]["shape_signature"][0])
        self.fixed_batch = None if batch == -1 else batch
        self.batch = 0

    def run(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) != self.batch:  # the interpreter is sized for one batch size at a time
            self.interpreter.resize_tensor_input(self.input, batch.shape)
            self.interpreter.allocate_tensors()
            self.batch = len(batch)
        self.interpreter.set_tensor(self.input, batch)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output).copy()


def open_runtime(path: Path) -> Runtime:
    return OnnxRuntime(path) if path.suffix.lower() == ".onnx" else LiteRtRuntime(path)


def convert(path: Path, channels_last: bool) -> Callable[[Tensor], Tensor]:
    """The file as a differentiable module taking ``[B, 3, H, W]`` network inputs -> ``[B, D]``.

    Raises:
        UnsupportedModelError: the file has operators without a conversion rule.
    """
    if path.suffix.lower() == ".onnx":
        graph = load_onnx(path)
        if channels_last:  # the ONNX graph reads its input as laid out in the file
            return ChannelsLast(graph)
        return Flattened(graph)
    data = path.read_bytes()
    inputs, outputs = tflite_io_names(data)
    key = f"tflite-{hashlib.sha256(data).hexdigest()[:16]}"
    return Flattened(load_converted(key, lambda: nodes_from_tflite(data), inputs, outputs))  # takes NCHW itself


class Flattened(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten(1)


class ChannelsLast(Flattened):
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.permute(0, 2, 3, 1)).flatten(1)


class ModelFileRecognizer(FaceRecognizer):
    """A model file: embeddings from its runtime, or from its converted module when gradients are asked for."""

    spec: ClassVar[ModelFileSpec]
    runtime: ClassVar[Runtime]

    def __init__(self) -> None:
        super().__init__()
        self.placement = nn.Parameter(torch.zeros(0))  # a target lives on a device even when no module is converted
        self.net = convert(self.spec.model, self.runtime.channels_last) if self.offers == "gradients" else None
        self.native = self.net is None

    @classmethod
    def weights_fingerprint(cls) -> str:
        """The model file's content, and the YAML's that says how to feed it."""
        digest = hashlib.sha256(cls.spec.model.read_bytes())
        if cls.spec.source is not None:
            digest.update(cls.spec.source.read_bytes())
        return digest.hexdigest()

    def limit_to(self, access: Access) -> None:
        """Queries of scores or decisions are answered by the file's own runtime, as the vendor's SDK would."""
        self.native = self.native or access != "gradients"

    def embed(self, images: Tensor) -> Tensor:
        inputs = self.preprocess(images)
        # A gradient is only ever asked of the conversion: by white-box attacks, or by the engine's own checks
        # (which know the model) when attackers get scores only; every answer without one may come from the runtime.
        if self.net is not None and (not self.native or inputs.requires_grad):
            return self.net(inputs)
        answered = self.runtime(inputs.detach().float().cpu().numpy())
        return torch.from_numpy(answered).to(device=images.device, dtype=images.dtype)


def _parity(runtime: Runtime, net: Callable[[Tensor], Tensor], preprocessing: Preprocessing) -> float:
    """Max |difference| between conversion and runtime over the largest |runtime output|, on two seeded random
    images (their content does not matter to the arithmetic)."""
    images = torch.rand(2, 3, 250, 250, generator=torch.Generator().manual_seed(0))
    inputs = preprocessing(images)
    expected = runtime(inputs.numpy())
    with torch.no_grad():
        got = net(inputs).numpy()
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12))


@TARGETS.register_scheme("file", "a recogniser's model file (.onnx, .tflite) in its own runtime (file:model.onnx)")
def model_file_target(argument: str) -> type[ModelFileRecognizer]:
    """The target class for the model file (or model file spec) at ``argument``."""
    spec = ModelFileSpec.load(argument)
    runtime = open_runtime(spec.model)
    # A graph that normalises its input itself wants raw pixels (unless a YAML says how to feed it).
    itself = spec.source is None and spec.model.suffix.lower() == ".onnx" and normalises_its_input(spec.model)
    raw = spec.mean is None or itself
    preprocessing = Preprocessing(
        size=runtime.size,
        crop=spec.crop_for(runtime.size),
        channels=spec.channels,
        mean=(0.0, 0.0, 0.0) if raw else spec.mean,
        scale=1.0 if raw else spec.scale,
        notes=("raw pixels in [0, 255]" + (": the graph normalises its input itself" if itself else "")) if raw else "",
    )
    offers: Access = "scores"
    try:
        error = _parity(runtime, convert(spec.model, runtime.channels_last), preprocessing)
    except UnsupportedModelError as unsupported:
        parity = f"not converted ({unsupported}): a score oracle only"
    else:
        parity = f"max |embedding difference| vs {runtime.name} on 2 random images: {error:.1e} of the largest value"
        if error <= PARITY_TOLERANCE:
            offers = "gradients"
        else:
            parity += f": over {PARITY_TOLERANCE:g}, so gradients are not offered"
    if offers != "gradients":
        console.print(f"note: {spec.model}: {parity}")
    card = ModelCard(
        name=f"file:{argument}",
        task="recognition",
        architecture=f"the model in {spec.model.name}, run in {runtime.name}",
        weights=f"user file {spec.model}",
        licence="that of the user's file",
        preprocessing=preprocessing,
        metric=spec.metric,
        threshold=spec.threshold,
        parity=parity,
        notes="" if spec.threshold is not None else "threshold unknown until `redteam calibrate` or --threshold",
    )
    # The runtime opened here (to read the input layout and check parity) answers every instance's queries.
    attributes = {"spec": spec, "card": card, "offers": offers, "user_file": spec.model, "runtime": runtime}
    return type(f"File_{spec.model.stem}", (ModelFileRecognizer,), attributes)
