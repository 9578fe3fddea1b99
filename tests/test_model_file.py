"""Model files as targets (``--target file:model.onnx`` / ``.tflite``): the real MobileFaceNet files run in their own
runtimes, agree with redteam's conversion on real faces, answer score queries from the runtime, get a threshold
from ``redteam calibrate`` kept for the file's content, and a file redteam cannot convert is a score oracle whose
gradient attack is refused before any work."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from helpers import shared_path
from onnx import TensorProto, helper

from redteam.api import TARGETS
from redteam.engine import load_target
from redteam.errors import RedteamError

pytest.importorskip("onnxruntime", reason="file:*.onnx runs in onnxruntime (PyPI onnxruntime)")
pytest.importorskip("ai_edge_litert.interpreter", reason="file:*.tflite runs in LiteRT (PyPI ai-edge-litert)")

REAL_FILES = ["mobilefacenet.onnx", "MobileFaceNet.tflite"]  # ../shared/weights: real MobileFaceNets (its README)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Calibrations (and conversions) go to a cache of the test's own."""
    monkeypatch.setenv("REDTEAM_CACHE", str(tmp_path / "cache"))


def tiny_unconvertible_model(path, gain=(3.0, 5.0, 7.0)):
    """A [N, 3, 112, 112] -> [N, 3] "recogniser" whose Sin node has no conversion rule (onnxruntime runs it)."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Mul", ["flat", "gain"], ["scaled"]),
        helper.make_node("Sin", ["scaled"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor("gain", TensorProto.FLOAT, [3], list(gain))],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_model_file_converts_and_matches_its_runtime_on_real_faces(name, faces):
    path = shared_path("weights", name)
    target_class = TARGETS.get(f"file:{path}")
    assert target_class.offers == "gradients"  # converted, parity within tolerance at load
    assert "vs " in target_class.card.parity and "not converted" not in target_class.card.parity
    white_box = load_target(f"file:{path}", torch.device("cpu"), threshold=0.3)
    oracle = load_target(f"file:{path}", torch.device("cpu"), threshold=0.3, access="scores")
    assert not white_box.native and oracle.native
    # Two photos each of three people.
    people = [who for who, indices in faces.by_identity.items() if len(indices) >= 2][:3]
    indices = [k for who in people for k in faces.by_identity[who][:2]]
    images = faces.load(indices)
    with torch.no_grad():
        converted, native = white_box.embed(images), oracle.embed(images)
    assert (converted - native).abs().max() <= 1e-4 * native.abs().max()
    # The runtime's own answer, fed the same network input.
    direct = oracle.runtime(oracle.preprocess(images).numpy())
    assert np.array_equal(native.numpy(), direct)
    cosine = F.cosine_similarity(native[:, None], native[None], dim=-1)
    genuine = torch.tensor([cosine[0, 1], cosine[2, 3], cosine[4, 5]])
    impostor = torch.tensor([cosine[0, 2], cosine[0, 4], cosine[2, 4], cosine[1, 3], cosine[1, 5], cosine[3, 5]])
    assert genuine.min() > impostor.max()


def test_scores_access_keeps_gradients_for_the_engines_checks_only():
    path = shared_path("weights", "mobilefacenet.onnx")
    oracle = load_target(f"file:{path}", torch.device("cpu"), threshold=0.3, access="scores")
    images = torch.rand(2, 3, 112, 112, requires_grad=True)
    oracle.embed(images).sum().backward()  # the conversion answers a gradient ...
    assert images.grad is not None and images.grad.abs().sum() > 0
    with torch.no_grad():  # ... the runtime every query
        assert not oracle.embed(images).requires_grad


def test_calibrate_keeps_the_files_threshold_for_its_content(cli, small_faces, tmp_path):
    model = tiny_unconvertible_model(tmp_path / "vendor.onnx")
    assert cli("calibrate", "--target", f"file:{model}", "--data", small_faces.root, "--impostors", 2000) == 0
    moved = shutil.copy(model, tmp_path / "renamed.onnx")  # the same content under another name
    target = load_target(f"file:{moved}", torch.device("cpu"))
    assert target.card.threshold is not None and "redteam calibrate" in target.card.calibration
    tiny_unconvertible_model(model, gain=(3.0, 5.0, 8.0))  # other content: no threshold until it is calibrated
    with pytest.raises(RedteamError, match="no calibrated threshold"):
        _ = load_target(f"file:{model}", torch.device("cpu")).threshold


def test_unconvertible_file_is_a_score_oracle_and_a_gradient_attack_fails_first(cli, tmp_path, capsys, faces_root):
    model = tiny_unconvertible_model(tmp_path / "vendor.onnx")
    target_class = TARGETS.get(f"file:{model}")
    assert target_class.offers == "scores" and "Sin" in target_class.card.parity
    code = cli("run", "--target", f"file:{model}", "--attack", "pgd", "--data", faces_root, "--threshold", 0.5,
               "--limit", 2, "--out", tmp_path / "run")  # fmt: skip
    error = capsys.readouterr().err
    assert code != 0 and "pgd needs gradients" in error and "answers scores" in error
    assert not (tmp_path / "run" / "results.sqlite").exists()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.onnx", None, "no such file"),
        ("notes.txt", "hello", "give an .onnx or .tflite model"),
        ("spec.yaml", "model: absent.onnx\n", "is not an .onnx or .tflite file here"),
        ("spec.yaml", "model: vendor.onnx\ncrop: sideways\n", "crop is insightface or central:FRACTION"),
        ("spec.yaml", "model: vendor.onnx\nsize: 3\n", "a model file spec is a mapping with model:"),
    ],
)
def test_bad_model_file_names_are_one_line_errors(name, content, message, tmp_path):
    tiny_unconvertible_model(tmp_path / "vendor.onnx")
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(RedteamError, match=message) as raised:
        TARGETS.get(f"file:{tmp_path / name}")
    assert "\n" not in str(raised.value)
