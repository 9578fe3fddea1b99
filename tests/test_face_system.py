"""A whole face system as a target (``mtcnn+arcface``) on raw LFW photos: it finds, aligns and recognises faces as
the recogniser does on photos aligned by ``--align``, rejects a photo without a face, passes gradients to the photo
with landmarks fixed or through the detector, accepts only faces its liveness check finds live, runs an attack from
the command line, and refuses chains that cannot work in one line."""

from __future__ import annotations

import sqlite3

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from redteam.api import TARGETS, CampaignContext
from redteam.attacks.glasses import Glasses
from redteam.datasets import ImageFolderDataset
from redteam.engine import load_target
from redteam.errors import RedteamError
from redteam.results import SYSTEM_STAGES


@pytest.fixture(scope="module")
def system():
    return load_target("mtcnn+arcface", torch.device("cpu"))


@pytest.fixture(scope="module")
def photos(faces_root):
    """Two raw photos (the whole LFW image) each of three people, and the same photos aligned by --align."""
    raw = ImageFolderDataset(faces_root)
    people = [who for who, indices in raw.by_identity.items() if len(indices) >= 2][:3]
    indices = [k for who in people for k in raw.by_identity[who][:2]]
    return raw.load(indices), ImageFolderDataset(faces_root, align=True).load(indices)


def test_the_system_recognises_raw_photos_as_its_recogniser_does_aligned_ones(system, photos):
    raw, aligned = photos
    with torch.no_grad():
        embedded = system.embed(raw)
        expected = system.recogniser.embed(aligned)
    assert embedded[:, 0].eq(1).all()  # a face found in every photo
    assert embedded[:, 1].eq(1).all()  # no liveness check: every face counts as live
    assert F.cosine_similarity(embedded[:, 2:], expected).min() > 0.999
    scores = system.similarity_matrix(embedded, embedded)
    genuine = torch.stack([scores[0, 1], scores[2, 3], scores[4, 5]])
    assert (genuine >= system.threshold).all()
    others = scores[[0, 0, 2, 1, 1, 3], [2, 4, 4, 3, 5, 5]]
    assert (others < system.threshold).all()


def test_a_photo_without_a_face_is_rejected(system, photos):
    raw, _ = photos
    blank = torch.full_like(raw[:1], 0.5)
    with torch.no_grad():
        embedded = system.embed(torch.cat([raw[:1], blank]))
    assert embedded[:, 0].tolist() == [1.0, 0.0]
    rejected = system.similarity(embedded[1:], embedded[:1])
    assert rejected.item() == pytest.approx(system.threshold - 1.0)


@pytest.fixture(scope="module")
def scene(photos):
    """Two people side by side, the one on the left larger (``[1, 3, 250, 500]``), and each alone (``[2, 3, 250,
    250]``)."""
    raw, _ = photos
    left, right = raw[0:1], raw[2:3]  # different people
    scene = torch.zeros(1, 3, 250, 500)
    scene[..., :250] = left
    scene[..., 40:215, 290:465] = F.interpolate(right, size=(175, 175), mode="bilinear", antialias=True)
    return scene, torch.cat([left, right])


def boxed_system(tmp_path, box: str) -> torch.nn.Module:
    """``mtcnn+arcface`` judging the face over ``box``."""
    spec = tmp_path / f"{len(box)}.yaml"
    spec.write_text(f"detector: mtcnn\nrecogniser: arcface\nbox: {box}\n")
    return load_target(f"system:{spec}", torch.device("cpu"))


def test_a_system_with_a_box_judges_the_face_over_it_not_the_largest(system, scene, tmp_path):
    """The default system judges the larger face on the left; one whose box covers the right half judges the right
    face; one whose box holds no face finds none."""
    scene, each = scene
    boxed, empty = boxed_system(tmp_path, "[250, 0, 500, 250]"), boxed_system(tmp_path, "[0, 0, 40, 40]")
    with torch.no_grad():
        alone = system.embed(each)
        by_default, by_box, by_empty = (model.embed(scene) for model in (system, boxed, empty))
    assert system.similarity(by_default, alone[:1]) > 0.9 > system.similarity(by_default, alone[1:])
    assert system.similarity(by_box, alone[1:]) > 0.9 > system.similarity(by_box, alone[:1])
    assert by_empty[0, 0] == 0 and empty.inspect(scene)[0] == ["no face"]
    assert "the face over the region [250.0, 0.0, 500.0, 250.0]" in boxed.card.architecture
    assert len({type(model).weights_fingerprint() for model in (system, boxed, empty)}) == 3  # runs keep them apart


@pytest.mark.parametrize("box", [None, "[250, 0, 500, 250]"])
def test_an_accessory_is_worn_on_the_face_the_system_judges(scene, tmp_path, box):
    """Glasses on the two-person photo go where the judging system looks: with a box, on the right face, not on
    the larger left one that a recogniser of crops (MTCNN's largest face) and the default system wear them on."""
    scene, _ = scene
    cpu = torch.device("cpu")
    targets = [boxed_system(tmp_path, box)] if box else [load_target("arcface", cpu), load_target("mtcnn+arcface", cpu)]
    for target in targets:
        context = CampaignContext(
            target=target,
            target_name=target.card.name,
            dataset=None,  # type: ignore[arg-type]  # only photos given here are looked at
            device=cpu,
            out=tmp_path,
            load_target=lambda name: load_target(name, cpu),
        )
        eyes = Glasses.landmarks_of(context, scene)[0, :2]
        assert (eyes[:, 0] > 250).tolist() == [bool(box)] * 2, target.card.name


def test_gradients_reach_the_photo_with_landmarks_fixed_or_through_the_detector(system, photos, tmp_path):
    raw, _ = photos
    spec = tmp_path / "face.yaml"
    spec.write_text("detector: mtcnn\nrecogniser: arcface\nlandmarks: detector\n")
    through = load_target(f"system:{spec}", torch.device("cpu"))
    gradients = []
    for model in (system, through):
        images = raw[:2].clone().requires_grad_(True)
        embedded = model.embed(images)
        model.similarity(embedded[:1], embedded[1:]).sum().backward()
        assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
        gradients.append(images.grad)
    assert not torch.allclose(gradients[0], gradients[1])  # moving the landmarks moves the crop: another gradient


def test_a_liveness_check_rejects_what_it_flags_and_the_score_climbs_both(photos):
    """The system's score is the recogniser's until the probe's liveness margin is the smaller (then that margin
    decides, and a gradient reaches the photo through the check too); a reference flagged as a spoof matches
    nothing."""
    checked = load_target("mtcnn+antispoof+arcface", torch.device("cpu"))
    raw, _ = photos
    images = raw[:2].clone().requires_grad_(True)
    embedded = checked.embed(images)
    with torch.no_grad():
        live = checked.liveness.live_score(checked.align(images)[1]) - checked.liveness.threshold
    assert torch.allclose(embedded[:, 1], live, atol=1e-6)
    score = checked.similarity(embedded[:1], embedded[1:])
    recognised = checked.recogniser.similarity(embedded[:1, 2:], embedded[1:, 2:])
    if live[1] >= 0:  # the reference looks live: the probe's margin caps the recogniser's
        expected = checked.threshold + torch.minimum(recognised - checked.threshold, live[0])
        assert torch.allclose(score, expected)
    flagged = embedded.detach().clone()
    flagged[1, 1] = -0.2  # the reference flagged as a spoof: no match whatever the recogniser says
    assert checked.similarity(flagged[:1], flagged[1:]).item() < checked.threshold
    flagged[1, 1], flagged[0, 1] = 0.2, -0.2  # the probe flagged: its margin is the score's
    assert checked.similarity(flagged[:1], flagged[1:]).item() == pytest.approx(checked.threshold - 0.2)
    score.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_an_attack_runs_through_the_system_from_the_command_line(cli, capsys, faces_root, tmp_path):
    command = ("run", "--target", "mtcnn+arcface", "--attack", "pgd", "--data", faces_root, "--limit", 2,
               "--eps", "0,8", "--steps", 3, "--no-checks", "--out", tmp_path)  # fmt: skip
    assert cli(*command) == 0
    assert "where mtcnn+arcface stopped the attacked probes: at ε 8: no face" in capsys.readouterr().out
    curve = pd.read_csv(tmp_path / "curve.csv").set_index("eps")["accuracy"]
    assert curve.loc[0.0] == 1.0 and curve.loc[8.0] < 1.0
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        rows = pd.read_sql_query("SELECT eps, correct, stage FROM results", db)
    assert set(rows["stage"]) <= set(SYSTEM_STAGES)
    # Dodging: a probe still decided correctly is one the system matched; a fooled one stopped somewhere before.
    assert (rows["correct"].astype(bool) == (rows["stage"] == "match")).all()
    assert cli("report", tmp_path, "--examples", 0) == 0
    assert "Where the face system stopped the attacked probes: at ε 8" in (tmp_path / "report.md").read_text()


def test_a_minimal_attack_through_the_system_says_where_its_examples_stopped(cli, capsys, faces_root, tmp_path):
    command = ("run", "--target", "mtcnn+arcface", "--attack", "cw", "--data", faces_root, "--limit", 2,
               "--steps", 5, "--no-checks", "--out", tmp_path)  # fmt: skip
    assert cli(*command) == 0
    said = " ".join(capsys.readouterr().out.split())
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        rows = pd.read_sql_query("SELECT size, stage FROM minimal", db)
    assert len(rows) == 2 and set(rows["stage"]) <= set(SYSTEM_STAGES)
    # Dodging: a probe the attack fooled stopped before a match, one it did not is still matched.
    assert ((rows["size"] < float("inf")) == (rows["stage"] != "match")).all()
    counts = ", ".join(f"{stage} {int((rows['stage'] == stage).sum())}" for stage in SYSTEM_STAGES)
    assert f"where mtcnn+arcface stopped the attacked probes: their smallest examples: {counts}" in said


def test_stages_are_where_the_system_stopped_what_it_saw_after_the_intruder(cli, faces_root, tmp_path):
    """A blur of 30 pixels wipes every face out before MTCNN looks: every probe stopped at "no face", in both the
    adaptive and the non-adaptive cell (not "no match", which the photo before the blur would give)."""
    command = ("run", "--target", "mtcnn+arcface", "--attack", "pgd", "--intruder", "blur:30", "--data", faces_root,
               "--limit", 2, "--eps", "0,2", "--steps", 1, "--no-checks", "--out", tmp_path)  # fmt: skip
    assert cli(*command) == 0
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        rows = pd.read_sql_query("SELECT cell, stage FROM results", db)
    assert rows["cell"].nunique() == 2 and (rows["stage"] == "no face").all(), rows


def test_a_checked_system_stores_each_attacked_probes_liveness_beside_its_match(cli, capsys, faces_root, tmp_path):
    command = ("run", "--target", "mtcnn+liveness+arcface", "--attack", "pgd", "--threat", "impersonation", "--data",
               faces_root, "--limit", 2, "--eps", "0,8", "--steps", 2, "--no-checks", "--out", tmp_path)  # fmt: skip
    assert cli(*command) == 0
    assert "liveness scores of the attacked probes: at ε 8: mean" in " ".join(capsys.readouterr().out.split())
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        rows = pd.read_sql_query("SELECT eps, stage, liveness FROM results WHERE eps > 0", db)
    assert rows["liveness"].between(0, 1).all()
    # The stored score is the check's: the probes it flagged are those scoring under its threshold.
    found = rows[rows["stage"] != "no face"]
    assert ((found["stage"] == "spoof") == (found["liveness"] < 0.5)).all()
    assert cli("report", tmp_path, "--examples", 0) == 0
    assert "Liveness scores of the attacked probes" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    "name, message",
    [
        ("arcface+mtcnn", "arcface is a recogniser"),
        ("mtcnn+mtcnn", "mtcnn is a detector"),
        ("mtcnn+facenet+arcface", "facenet is not a liveness check"),
        ("mtcnn+liveness+arcface+facenet", r"a face system is DETECTOR\[\+LIVENESS\]\+RECOGNISER"),
        ("mtcnn+nobody", "unknown target 'nobody'"),
    ],
)
def test_chains_that_cannot_work_are_one_line_errors(name, message):
    with pytest.raises(RedteamError, match=message) as raised:
        TARGETS.get(name)
    assert "\n" not in str(raised.value)


def test_a_detector_without_landmark_gradients_cannot_pass_them(tmp_path):
    spec = tmp_path / "face.yaml"
    spec.write_text("detector: retinaface\nrecogniser: arcface\nlandmarks: detector\n")
    with pytest.raises(RedteamError, match="retinaface gives no landmark gradients; use landmarks: fixed"):
        TARGETS.get(f"system:{spec}")


@pytest.mark.parametrize("box", ["[10, 10, 5, 50]", "[1, 2, 3]", "[0, 0, true, 9]", "left", "7"])
def test_a_bad_box_is_one_line(tmp_path, box):
    spec = tmp_path / "face.yaml"
    spec.write_text(f"detector: mtcnn\nrecogniser: arcface\nbox: {box}\n")
    with pytest.raises(RedteamError, match=r"box is \[x1, y1, x2, y2\] in pixels with x1 < x2") as raised:
        TARGETS.get(f"system:{spec}")
    assert "\n" not in str(raised.value)
