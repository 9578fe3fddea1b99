"""The TF.js reader decodes weights exactly as tfjs does and its graphs compute what tfjs computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.tfjs_node import model_folder, run_reference

from redteam.convert.tfjs import TFJSModel, load_tfjs_graph, load_tfjs_weights, nodes_from_model_json, read_weights
from redteam.datasets import FACE_API
from redteam.targets.arcface import HUMAN_MODELS, INSIGHTFACE_CROP
from redteam.targets.faceapi import RECOGNITION_MODEL

# Weights decoded by both readers: uint8 -> float32 (face-api's recognition net), uint8 -> int32 and float32 (its
# SSD detector), float16 (human's anti-spoofing model).
SSD_MOBILENET = TFJSModel(
    FACE_API.file(
        "package/model/ssd_mobilenetv1_model-weights_manifest.json",
        "888f744dffbc84f5f060d1f8427d9742341943a2dfaaf9205d10029b7e7a2955",
    ),
    (
        FACE_API.file(
            "package/model/ssd_mobilenetv1_model.bin",
            "2835640602d53718aa6ae9a42896327eaa21beefed056c218d32ca7d79e1e2f8",
        ),
    ),
)
ANTISPOOF = TFJSModel(
    HUMAN_MODELS.file(
        "package/models/antispoof.json", "7fd698ae1cebabbcad79d3b8b448587b0365eb7911987418231bdcf36583112a"
    ),
    (
        HUMAN_MODELS.file(
            "package/models/antispoof.bin", "4490fecb2becdb6869edc7e60f5e59962be013a8def8719b1373afb0f905c094"
        ),
    ),
)
# sirius-ai's MobileFaceNet: fused convolutions with BiasAdd (+ Relu), Squeeze and an L2 norm. It is a poor face
# recogniser as published (see targets/arcface.py) but a faithful test of the graph converter.
MOBILEFACENET = TFJSModel(
    HUMAN_MODELS.file(
        "package/models/mobilefacenet.json", "bfbf27662ca1080dfd1b0a884aa166c135c1b7746b57385ecb44268828beb82a"
    ),
    (
        HUMAN_MODELS.file(
            "package/models/mobilefacenet.bin", "c60e392478df0a2fd756f9a230c9935a04d136e9d3bf12e99a850d4802806089"
        ),
    ),
)


@pytest.mark.parametrize("model", [RECOGNITION_MODEL, SSD_MOBILENET, ANTISPOOF], ids=["uint8", "int32", "float16"])
def test_dequantised_weights_equal_tfjs_decoder(model, tmp_path):
    manifest, shards = model.read()
    ours = read_weights(manifest["weightsManifest"] if isinstance(manifest, dict) else manifest, shards)
    json_path = model_folder(model, tmp_path / "model")
    run_reference({"kind": "weights", "manifest": str(json_path), "output": str(tmp_path / "out")}, tmp_path, {})
    names = json.loads((tmp_path / "out" / "names.json").read_text())
    assert names == list(ours)
    for index, name in enumerate(names):
        reference = np.load(tmp_path / "out" / f"{index}.npy")
        assert ours[name].shape == reference.shape, name
        np.testing.assert_array_equal(ours[name].astype(np.float32), reference, err_msg=name)


def test_weights_manifest_loads_by_name():
    weights = load_tfjs_weights(RECOGNITION_MODEL)
    assert weights["conv32_down/conv/filters"].shape == (7, 7, 3, 32)
    assert weights["fc"].shape == (256, 128) and weights["fc"].dtype == np.float32


def _spec(name: str, shape: list[int], dtype: str, quantization: dict | None = None) -> dict:
    spec = {"name": name, "shape": shape, "dtype": dtype}
    return {**spec, "quantization": quantization} if quantization else spec


def test_quantisation_rules_by_hand():
    """uint16 affine values, int32 rounding half up (JS Math.round) and float16, on bytes written here."""
    manifest = [
        {
            "paths": ["a.bin", "b.bin"],
            "weights": [
                _spec("u16", [2], "float32", {"dtype": "uint16", "scale": 0.5, "min": -1.0}),
                _spec("i32", [3], "int32", {"dtype": "uint8", "scale": 0.5, "min": -2.0}),
                _spec("f16", [2], "float32", {"dtype": "float16"}),
                _spec("plain", [1, 2], "float32"),
            ],
        }
    ]
    data = (
        np.array([0, 7], "<u2").tobytes()
        + np.array([1, 3, 4], "u1").tobytes()  # -1.5 -> -1, -0.5 -> 0, 0 -> 0
        + np.array([1.5, -2.25], "<f2").tobytes()
        + np.array([[3.0, -4.0]], "<f4").tobytes()
    )
    weights = read_weights(manifest, {"a.bin": data[:5], "b.bin": data[5:]})
    np.testing.assert_array_equal(weights["u16"], [-1.0, 2.5])
    np.testing.assert_array_equal(weights["i32"], [-1, 0, 0])
    assert weights["i32"].dtype == np.int32
    np.testing.assert_array_equal(weights["f16"], [1.5, -2.25])
    np.testing.assert_array_equal(weights["plain"], [[3.0, -4.0]])
    with pytest.raises(ValueError, match="missing"):
        read_weights(manifest, {"a.bin": data[:5]})
    with pytest.raises(ValueError, match="no weight describes"):
        read_weights(manifest, {"a.bin": data[:5], "b.bin": data[5:] + b"\0"})


def test_bare_weights_manifest_is_not_a_graph():
    manifest, shards = RECOGNITION_MODEL.read()
    with pytest.raises(ValueError, match="not a TF.js graph model"):
        nodes_from_model_json({"weightsManifest": manifest}, shards)


def test_graph_matches_tfjs_on_real_faces(faces, tmp_path):
    net = load_tfjs_graph(MOBILEFACENET, inputs=["img_inputs"], outputs=["embeddings"])
    x = (INSIGHTFACE_CROP(faces.load(range(0, 60, 10)), (112, 112)) * 255 - 127.5) / 128
    with torch.no_grad():
        ours = net(x).numpy()
    json_path = model_folder(MOBILEFACENET, tmp_path / "model")
    job = {"kind": "graph", "model": str(json_path), "inputs": {"img_inputs": str(tmp_path / "x.npy")}}
    run_reference(
        {**job, "outputs": {"embeddings": str(tmp_path / "y.npy")}}, tmp_path, {"x": x.permute(0, 2, 3, 1).numpy()}
    )
    reference = np.load(tmp_path / "y.npy")
    assert reference.shape == ours.shape == (6, 192)
    assert np.abs(ours - reference).max() < 1e-5
