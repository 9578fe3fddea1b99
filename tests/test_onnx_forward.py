"""``--forward onnxruntime``: a recogniser's forward passes from onnxruntime on its export, and a detector's on the
ONNX file it was converted from, agree with the torch module on real faces, give no gradients, are refused where
they cannot serve, and a query attack runs on them from the command line with the same verdicts as on torch."""

from __future__ import annotations

import sqlite3

import pandas as pd
import pytest
import torch
from helpers import shared_path

from redteam.budgets import eight_bit
from redteam.engine import EvaluationConfig, load_target
from redteam.errors import RedteamError
from redteam.runtime import choose_threads

pytest.importorskip("onnxruntime", reason="--forward onnxruntime needs onnxruntime (pip install onnxruntime)")


@pytest.mark.parametrize("name", ["arcface", "dlib-resnet"])
def test_embeddings_match_the_torch_module_on_real_faces(name, faces):
    images = faces.load(range(0, 40, 10))  # 4 faces of different people
    torch_target = load_target(name, torch.device("cpu"), access="scores")
    onnx_target = load_target(name, torch.device("cpu"), access="scores", forward="onnxruntime")
    with torch.no_grad():
        ours, theirs = torch_target.embed(images), onnx_target.embed(images)
    assert theirs.dtype == torch.float32 and theirs.shape == ours.shape
    assert (ours - theirs).abs().max() < 1e-4 * ours.abs().max()  # float32 rounding of two runtimes


@pytest.mark.parametrize("name", ["facenet", "arcface"])
def test_a_face_gets_the_same_bits_alone_or_in_a_batch(name, faces):
    """What lets a run in-process reproduce one against `redteam serve --forward onnxruntime` (which embeds each
    upload alone) to the last bit: a face's embedding depends neither on the batch it is in nor on torch's thread
    count (facenet resizes its crop on torch, whose resizing rounds differently on two threads than on one)."""
    clean = faces.load(range(0, 160, 10))
    noise = torch.rand(clean.shape, generator=torch.Generator().manual_seed(0))
    images = eight_bit(clean + 0.03 * (noise - 0.5), clean)  # queries as an attack sends them
    target = load_target(name, torch.device("cpu"), access="decisions", forward="onnxruntime")
    try:
        with torch.no_grad():
            choose_threads(2)
            batched = target.embed(images)
            choose_threads(1)
            alone = torch.cat([target.embed(image[None]) for image in images])
    finally:
        choose_threads(None)
    assert torch.equal(batched, alone)


@pytest.mark.parametrize("weights", [None, "scrfd_500m.onnx", "scrfd_2.5g.onnx"])
def test_a_detector_finds_the_same_faces_on_its_published_file(weights, faces):
    """RetinaFace's file takes any batch; InsightFace's SCRFD files take one image at a time, and answer a batch of
    four with the torch module's scores, boxes and landmarks."""
    name, path = ("retinaface", None) if weights is None else ("scrfd", shared_path("weights", weights))
    images = faces.load(range(0, 40, 10))
    torch_target, onnx_target = (
        load_target(name, torch.device("cpu"), weights=path, access="scores", forward=forward)
        for forward in ("torch", "onnxruntime")
    )
    with torch.no_grad():
        ours, theirs = torch_target.face_score(images), onnx_target.face_score(images)
        found, found_there = torch_target.detect(images), onnx_target.detect(images)
    assert (ours - theirs).abs().max() < 1e-5 and (ours > torch_target.threshold).all()
    for here, there in zip(found, found_there):
        assert len(here.boxes) == len(there.boxes) >= 1
        assert (here.boxes - there.boxes).abs().max() < 1e-3 and (here.landmarks - there.landmarks).abs().max() < 1e-3


def test_it_has_no_gradients(faces):
    target = load_target("arcface", torch.device("cpu"), access="decisions", forward="onnxruntime")
    with pytest.raises(RedteamError, match="no gradients"):
        target.embed(faces.load([0]).requires_grad_(True))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"target": "arcface", "attack": "pgd"}, "use it with --access score or decision"),
        ({"target": "mtcnn", "attack": "square", "access": "scores"}, "mtcnn runs on torch; on onnxruntime:"),
    ],
)
def test_refused_before_any_work_in_one_line(settings, message):
    with pytest.raises(RedteamError, match=message) as refused:
        EvaluationConfig(**settings, forward="onnxruntime").resolve()
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("target", [("arcface",), ("retinaface", "--threat", "evasion")])
def test_a_score_attack_runs_on_it_with_torchs_verdicts(target, cli, faces_root, tmp_path):
    """The same square attack, seed and probes on both runtimes: the same walk (the scores it ends at agree to
    float32 rounding), the same verdicts, the same queries spent."""
    rows = []
    for forward in ("torch", "onnxruntime"):
        command = ("run", "--target", *target, "--attack", "square", "--access", "score", "--queries", 40,
                   "--forward", forward, "--data", faces_root, "--limit", 3, "--eps", "0,16", "--no-checks",
                   "--out", tmp_path / forward)  # fmt: skip
        assert cli(*command) == 0
        with sqlite3.connect(tmp_path / forward / "results.sqlite") as db:
            query = "SELECT probe, eps, correct, score, queries FROM results ORDER BY probe, eps"
            rows.append(pd.read_sql_query(query, db))
    torch_rows, onnx_rows = rows
    assert len(torch_rows) == 6 and torch_rows["queries"].max() > 1
    pd.testing.assert_frame_equal(torch_rows.drop(columns="score"), onnx_rows.drop(columns="score"))
    assert (torch_rows["score"] - onnx_rows["score"]).abs().max() < 1e-4
