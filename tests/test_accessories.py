"""Glasses and masks: their outlines sit where frames and masks are worn and cover the asked area, their image
formation is differentiable, and short runs on real faces and a real recogniser beat a random and a plain print of
the same shape; a universal mask is learned on one half of the people and judged on the other."""

from __future__ import annotations

import hashlib
import io
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from redteam.align import CANONICAL_LANDMARKS, CANONICAL_SIZE
from redteam.api import CampaignContext
from redteam.attacks.accessory import coverage_of, photograph, wear
from redteam.attacks.glasses import Glasses
from redteam.attacks.mask import STANDARD_AREA, Mask
from redteam.datasets import ImageFolderDataset
from redteam.engine import load_target
from redteam.results import SYSTEM_STAGES

WEARER = "Bill_Gates"  # 10 photos: 1 enrolment, 2 optimised on, 7 held out
QUICK = ("--steps", "16", "--option", "draws=2", "--option", "train_photos=2")


@pytest.fixture(scope="module")
def people(faces_root, tmp_path_factory):
    """The wearer and 13 others, symlinked: a gallery that embeds in seconds."""
    root = tmp_path_factory.mktemp("accessory_faces")
    others = sorted(p.name for p in faces_root.iterdir() if p.is_dir() and p.name != WEARER)[:13]
    for name in (WEARER, *others):
        (root / name).symlink_to(faces_root / name, target_is_directory=True)
    return root


def canonical_coverage(accessory, area: float) -> torch.Tensor:
    """``[250, 250]``: how much of each canonical pixel the accessory covering ``area`` covers."""
    surface, width = accessory.surface(area)
    pose = accessory.nominal_pose(CANONICAL_LANDMARKS[None], width, surface)
    return coverage_of(torch.ones(1, 3, 50, 100), pose, CANONICAL_SIZE, surface)[0, 0]


def at(coverage: torch.Tensor, point: torch.Tensor) -> float:
    return coverage[round(point[1].item()), round(point[0].item())].item()


@pytest.mark.parametrize("area", [0.01, 0.02, Glasses.axes["area"].high])
def test_frames_cover_the_asked_area_around_clear_lenses(area):
    coverage = canonical_coverage(Glasses(), area)
    assert coverage.mean().item() == pytest.approx(area, rel=0.03)  # the widest rims still reach the axis' top
    left, right = CANONICAL_LANDMARKS[:2]
    assert at(coverage, left) == 0 and at(coverage, right) == 0  # the eyes look through the lenses
    rows, columns = torch.nonzero(coverage > 0.5, as_tuple=True)
    assert columns.float().mean().item() == pytest.approx(((left + right) / 2)[0].item(), abs=1.0)  # centred
    assert rows.min() < left[1] - 8 < left[1] + 8 < rows.max()  # rims above and below the eyes
    assert at(coverage, CANONICAL_LANDMARKS[2]) == 0  # the nose tip is below the frames


def test_a_wider_rim_covers_more():
    glasses = Glasses()
    rims = [glasses.sizes(area)["rim_mm"] for area in (0.005, 0.01, 0.02)]
    assert rims == sorted(rims) and rims[0] > 0


def test_the_standard_mask_covers_nose_mouth_and_chin_but_not_the_eyes():
    mask = Mask()
    coverage = canonical_coverage(mask, STANDARD_AREA)
    assert coverage.mean().item() == pytest.approx(STANDARD_AREA, rel=0.03)
    assert mask.printed_size_mm(STANDARD_AREA)[0] == pytest.approx(175, rel=0.03)  # a surgical mask is 17.5 cm wide
    for point in CANONICAL_LANDMARKS[2:]:
        assert at(coverage, point) == 1  # nose tip and mouth corners
    chin = (CANONICAL_LANDMARKS[3:].mean(0) + torch.tensor([0.0, 20.0])).round()
    assert at(coverage, chin) == 1
    for eye in CANONICAL_LANDMARKS[:2]:
        assert at(coverage, eye) == 0 and at(coverage, eye + torch.tensor([0.0, 8.0])) == 0


@pytest.mark.parametrize("accessory", [Glasses(), Mask()], ids=["glasses", "mask"])
def test_image_formation_through_the_outline_is_differentiable(accessory):
    """kornia's style: float64 gradcheck on small inputs, through the outline, bend and placement, and through the
    random shooting conditions (a fixed draw)."""
    surface, width = accessory.surface(accessory.axes["area"].defaults[-1])
    faces = torch.rand(2, 3, 24, 24, dtype=torch.float64) * 0.6 + 0.2
    texture = torch.rand(1, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    landmarks = (CANONICAL_LANDMARKS[None] * 24 / CANONICAL_SIZE).repeat(2, 1, 1).double()
    landmarks[1] += 0.7
    pose = accessory.nominal_pose(landmarks, width, surface)
    assert torch.autograd.gradcheck(lambda t: wear(faces, t, pose, surface), (texture,))
    generator = torch.Generator().manual_seed(0)
    assert torch.autograd.gradcheck(
        lambda t: photograph(faces, t, pose, surface, 1.0, generator.manual_seed(0)), (texture,)
    )


def test_glasses_beat_random_and_plain_frames_and_print_as_a_cut_out(people, cli, tmp_path):
    command = ("run", "--target", "arcface", "--attack", "glasses", "--data", people, "--identity", WEARER)
    assert cli(*command, "--eps", "0,0.02", *QUICK, "--out", tmp_path) == 0
    metrics = json.loads((tmp_path / "run.json").read_text())["metrics"]
    assert metrics["held_out_photos"] == 7 and metrics["covered"] == pytest.approx(0.02, rel=0.1)
    # The three frames cover the same pixels of the same held-out photos; only the optimised ones were aimed.
    assert metrics["frames_similarity"] < min(metrics["random_similarity"], metrics["plain_similarity"]) - 0.05
    areas = pd.read_csv(tmp_path / "areas.csv")
    assert areas["rim_mm"].iloc[1] == pytest.approx(Glasses().sizes(0.02)["rim_mm"])
    transfer = pd.read_csv(tmp_path / "transfer.csv")
    assert {"arcface", "facenet"} <= set(transfer["target"]) and "plain_accuracy" in transfer.columns

    frames = Image.open(tmp_path / "glasses-frames.png")
    assert frames.mode == "RGBA" and frames.size == (900, 405)
    assert frames.info["dpi"][0] == pytest.approx(900 * 25.4 / Glasses().printed_size_mm(0.02)[0], rel=0.01)
    alpha = torch.tensor(np.asarray(frames.getchannel("A")))
    lens = alpha[202, round(900 * (1 / 2 - 0.5 / 2.2))]  # the left lens' centre, half an eye distance from the middle
    assert lens == 0 and alpha.float().mean() / 255 == pytest.approx(0.3, abs=0.15)


def test_a_universal_mask_is_learned_on_one_half_and_judged_on_the_other(people, cli, tmp_path):
    dataset = ImageFolderDataset(people)
    context = CampaignContext(target=None, target_name="arcface", dataset=dataset, device=torch.device("cpu"),
                              out=tmp_path, limit=10)  # type: ignore[arg-type]  # fmt: skip
    split = Mask(learn_photos=10).split_people(context)
    identity = [record.identity for record in dataset.records]
    learned_on, judged_on = {identity[i] for i in split.learn}, {identity[i] for i in split.judge}
    assert not learned_on & judged_on and len(learned_on) >= 5 and len(judged_on) >= 5
    assert not set(split.gallery) & {*split.learn, *split.judge}  # enrolment photos are never worn
    for photos, rows in ((split.learn, split.learn_rows), (split.judge, split.judge_rows)):
        assert [identity[split.gallery[row]] for row in rows] == [identity[i] for i in photos]

    command = ("run", "--target", "arcface", "--attack", "mask", "--data", people, "--limit", "10", "--steps", "12")
    options = ("--option", "learn_photos=12", "--option", "per_step=6", "--option", "draws=1")
    assert cli(*command, *options, "--out", tmp_path) == 0
    metrics = json.loads((tmp_path / "run.json").read_text())["metrics"]
    assert metrics["judged_photos"] == 10 and metrics["gallery"] == 14
    assert metrics["mask_similarity"] < min(metrics["random_similarity"], metrics["plain_similarity"])
    assert metrics["mask_verified"] <= metrics["clean_verified"]
    held_out = pd.read_csv(tmp_path / "held_out.csv")
    assert set(held_out["person"]) == judged_on
    assert held_out["mask_identified"].mean() == pytest.approx(metrics["mask_identified"])
    transfer = pd.read_csv(tmp_path / "transfer.csv")
    assert {"arcface", "facenet"} <= set(transfer["target"]) and "plain_identified" in transfer.columns
    arcface = transfer.set_index("target").loc["arcface"]
    assert arcface["mask_verified"] == pytest.approx(metrics["mask_verified"])  # the same judgement, twice
    assert Image.open(tmp_path / "mask-mask.png").mode == "RGBA"
    assert math.isclose(pd.read_csv(tmp_path / "curve.csv")["accuracy"].iloc[-1], metrics["mask_verified"])


def test_a_universal_mask_under_identification_logs_each_wearer_it_got_misidentified(people, cli, tmp_path):
    command = ("run", "--target", "arcface", "--attack", "mask", "--data", people, "--limit", "10", "--steps", "12")
    options = ("--option", "learn_photos=12", "--option", "per_step=6", "--option", "draws=1")
    assert cli(*command, *options, "--threat", "identification", "--out", tmp_path) == 0
    metrics = json.loads((tmp_path / "run.json").read_text())["metrics"]
    assert metrics["mask_identified"] < metrics["clean_identified"]
    held_out = pd.read_csv(tmp_path / "held_out.csv").set_index("photo")
    fooled = held_out.index[held_out["clean_identified"] & ~held_out["mask_identified"]].tolist()
    entries = [json.loads(line) for line in (tmp_path / "evidence.jsonl").read_text().splitlines()]
    assert [e["probe"] for e in entries] == fooled != []
    for entry in entries:
        assert (entry["attack"], entry["threat"], entry["eps"]) == ("mask", "identification", metrics["area"])
        assert entry["identity"] == held_out.loc[entry["probe"], "person"]
        assert entry["score"] == pytest.approx(held_out.loc[entry["probe"], "mask"])
        assert abs(entry["saved_score"] - entry["score"]) < 0.02
        assert hashlib.sha256((tmp_path / entry["image"]).read_bytes()).hexdigest() == entry["sha256"]


def test_a_mask_for_one_wearer_runs_like_the_other_accessories_and_logs_what_it_fooled(people, cli, tmp_path):
    command = ("run", "--target", "arcface", "--attack", "mask", "--data", people, "--identity", WEARER)
    assert cli(*command, *QUICK, "--out", tmp_path) == 0
    metrics = json.loads((tmp_path / "run.json").read_text())["metrics"]
    assert metrics["held_out_photos"] == 7 and "mask_accuracy" in metrics
    assert (tmp_path / "mask-faces.png").is_file()

    # Every photo the mask fooled arcface with is in the evidence log, worn, as a file that fools it as saved.
    photos = pd.read_csv(tmp_path / "held_out.csv").set_index("photo")
    entries = [json.loads(line) for line in (tmp_path / "evidence.jsonl").read_text().splitlines()]
    assert [e["probe"] for e in entries] == photos.index[photos["fooled"]].tolist() != []
    dataset, arcface = ImageFolderDataset(people), load_target("arcface", torch.device("cpu"))
    context = CampaignContext(target=arcface, target_name="arcface", dataset=dataset, device=torch.device("cpu"),
                              out=tmp_path, identity=WEARER)  # fmt: skip
    enrolment, _, _ = Mask()._split(context)
    with torch.no_grad():
        reference = arcface.embed(dataset.load([enrolment]))
    for entry in entries:
        assert (entry["attack"], entry["identity"], entry["eps"]) == ("mask", WEARER, metrics["area"])
        assert entry["score"] == pytest.approx(photos.loc[entry["probe"], "mask"])
        data = (tmp_path / entry["image"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        saved = torch.from_numpy(np.array(Image.open(io.BytesIO(data)))).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            similarity = arcface.similarity(arcface.embed(saved), reference).item()
        assert similarity == pytest.approx(entry["saved_score"], abs=1e-4)
        assert entry["saved_fooled"] == (similarity < entry["threshold"])


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--threat", "impersonation"), "a universal mask (no --identity) supports --threat dodging or identification"),
        (("--identity", WEARER, "--threat", "identification"), "a mask for one wearer (--identity) supports"),
        (("--eps", "0,0.2"), "mask areas"),
    ],
)
def test_bad_mask_input_is_one_clear_line(people, cli, tmp_path, capsys, extra, message):
    assert cli("run", "--target", "arcface", "--attack", "mask", "--data", people, *extra, "--out", tmp_path) == 2
    error = capsys.readouterr().err
    assert message in " ".join(error.split()) and "Traceback" not in error


def test_a_universal_mask_through_a_face_system_says_where_it_stopped_each_wearer(people, cli, tmp_path):
    command = ("run", "--target", "mtcnn+arcface", "--attack", "mask", "--data", people, "--limit", "10")
    options = ("--steps", "2", "--option", "learn_photos=6", "--option", "per_step=3", "--option", "draws=1")
    assert cli(*command, *options, "--out", tmp_path) == 0
    metrics = json.loads((tmp_path / "run.json").read_text())["metrics"]
    held_out = pd.read_csv(tmp_path / "held_out.csv")
    assert set(held_out["stage"]) <= set(SYSTEM_STAGES)
    assert metrics["mask_matched"] == pytest.approx((held_out["stage"] == "match").mean())
    assert metrics["mask_face_found"] == pytest.approx((held_out["stage"] != "no face").mean())
    assert 0 <= metrics["clean_matched"] <= metrics["clean_face_found"] <= 1
