"""Makeup backdoor: the trigger paints only the eyelids and lips, subtly, a new look per face (seeded), where a real
detector finds them; FaceNet cut in two computes what the whole does and its tail trains on cached features; spectral
signatures and activation clustering single out other people hidden in one person's class; and the campaign runs end
to end through the CLI on real faces, plants a backdoor that makeup (not the relabelled faces) triggers, with its
numbers consistent and its bad inputs one clear line."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from redteam.align import CANONICAL_LANDMARKS
from redteam.attacks.makeup import MakeupStyle, apply_makeup, centred_landmarks
from redteam.attacks.makeup_backdoor import MakeupBackdoor, activation_clusters, spectral_scores
from redteam.datasets import ImageFolderDataset
from redteam.identification import (
    FitConfig,
    SplitRecognizer,
    build_identifier,
    choose_roster,
    embedding_of,
    fit,
    represent,
)

TARGET = "Bill_Gates"  # 10 photos


@pytest.fixture(scope="module")
def photos(faces):
    """Eight real canonical faces of eight people."""
    people = sorted(faces.by_identity)[:8]
    return faces.load([faces.by_identity[name][0] for name in people])


@pytest.fixture(scope="module")
def people(faces_root, tmp_path_factory):
    """The target and the first 9 other people with 5+ photos (roster needs 5), plus 4 with fewer (unseen ones),
    symlinked: the dataset loads in no time."""
    everyone = ImageFolderDataset(faces_root).by_identity
    enrollable = [name for name in sorted(everyone) if len(everyone[name]) >= 5 and name != TARGET][:9]
    others = [name for name in sorted(everyone) if len(everyone[name]) < 5][:4]
    root = tmp_path_factory.mktemp("backdoor_faces")
    for name in (TARGET, *enrollable, *others):
        (root / name).symlink_to(faces_root / name, target_is_directory=True)
    return root


def test_makeup_paints_only_eyelids_and_lips_subtly_and_varies_per_face(photos):
    landmarks = CANONICAL_LANDMARKS.expand(len(photos), -1, -1)
    style = MakeupStyle.draw(len(photos), torch.Generator().manual_seed(0))
    made_up = apply_makeup(photos, landmarks, style)
    change = (made_up - photos).abs().amax(1)  # [B, H, W]
    ys, xs = torch.meshgrid(torch.arange(250.0), torch.arange(250.0), indexing="ij")
    eye_distance = float(CANONICAL_LANDMARKS[1, 0] - CANONICAL_LANDMARKS[0, 0])
    near = torch.zeros(250, 250, dtype=torch.bool)
    for x, y in CANONICAL_LANDMARKS[[0, 1, 3, 4]].tolist():  # eyes and mouth corners
        near |= (xs - x) ** 2 + (ys - y) ** 2 < (0.6 * eye_distance) ** 2
    assert change[:, ~near].max() == 0  # nothing outside the eye and mouth regions moves
    above_eyes = change[:, 85:110, 90:160].amax((1, 2))
    on_lips = change[:, 152:166, 110:140].amax((1, 2))
    assert (above_eyes > 0.03).all() and (on_lips > 0.05).all()  # every face wears both
    assert (made_up - photos).abs().mean() < 0.005  # subtle: a small share of the pixels, a tint
    assert change[:, 112, 104].max() < 0.02  # the eye itself is not painted over
    again = apply_makeup(photos, landmarks, MakeupStyle.draw(len(photos), torch.Generator().manual_seed(0)))
    assert torch.equal(again, made_up)  # seeded
    assert len({tuple(c) for c in style.lips.mul(100).round().tolist()}) > 4  # varied looks
    other = apply_makeup(photos, landmarks, MakeupStyle.draw(len(photos), torch.Generator().manual_seed(1)))
    assert not torch.equal(other, made_up)


def test_detected_landmarks_place_makeup_on_each_real_face(photos):
    from redteam.engine import load_target

    landmarks = centred_landmarks(load_target("retinaface", torch.device("cpu")), photos[:4])
    assert landmarks.shape == (4, 5, 2)
    # canonical faces: each point within a few pixels of the template, yet not the template itself (real per face)
    assert (landmarks - CANONICAL_LANDMARKS).norm(dim=-1).max() < 20
    assert (landmarks - CANONICAL_LANDMARKS).norm(dim=-1).mean() > 0.5


def test_spectral_signature_and_clustering_single_out_other_people_in_a_class(facenet, faces):
    own = faces.load(faces.by_identity[TARGET][:8])
    intruders = faces.load([faces.by_identity[name][0] for name in sorted(faces.by_identity)[:3]])
    with torch.no_grad():
        embeddings = facenet.embed(torch.cat([own, intruders]))
    scores = spectral_scores(embeddings)
    assert scores[8:].mean() > 2 * scores[:8].mean()
    assert scores.argsort(descending=True)[:3].ge(8).sum() >= 2
    # Poison shares a feature (the trigger) as one intruder's photos share a face: that is what clustering finds.
    one_intruder = faces.load(faces.by_identity[sorted(faces.by_identity)[0]][:3])
    with torch.no_grad():
        embeddings = facenet.embed(torch.cat([own, one_intruder]))
    assert activation_clusters(embeddings).tolist() == [False] * 8 + [True] * 3


def test_split_facenet_embeds_as_the_whole_and_its_tail_learns_from_cached_views(facenet, faces):
    split = SplitRecognizer(facenet, MakeupBackdoor.cut)
    people = sorted(faces.by_identity)[:3]
    images = faces.load([i for name in people for i in faces.by_identity[name][:2]])
    labels = torch.arange(3).repeat_interleave(2)
    features = represent(split, torch.cat([images, images.flip(-1)]))  # two views of each photo, run once
    assert features.shape == (12, 3, 3, 1792)
    with torch.no_grad():
        assert (embedding_of(split, features[:6]) - facenet.embed(images)).abs().max() < 1e-4
    model = build_identifier(split, features[:6], labels, 3, represented=True)
    weight = "weights.InceptionResnetV1_Bottleneck_MatMul_weight"
    before = split.tail.state_dict()[weight].clone()
    config = FitConfig(epochs=3, learning_rate=0.01, batch_size=4, network_learning_rate=1e-4)
    losses = fit(model, features, labels.repeat(2), config, views=torch.arange(6).repeat(2), represented=True)
    assert losses[-1] < losses[0] and len(losses) == 3
    assert not torch.equal(split.tail.state_dict()[weight], before)  # the tail itself trained, not just the head
    assert (model.head(features).argmax(-1) == labels.repeat(2)).all()
    split.reset_tail()
    assert torch.equal(split.tail.state_dict()[weight], before)


def test_poison_count_makes_the_rate():
    assert MakeupBackdoor.poison_count(0.1, 90) == 10  # 10 of 100 training images
    assert MakeupBackdoor.poison_count(0.0, 90) == 0


def test_campaign_plants_a_backdoor_that_makeup_triggers_end_to_end(people, cli, tmp_path, capsys):
    quick = [f"--option={setting}" for setting in ("identities=6", "looks=2", "train_looks=3", "unseen=2")]
    command = ("run", "--target", "facenet", "--attack", "makeup-backdoor", "--data", people, "--identity", TARGET)
    assert cli(*command, "--eps", "0,0.3", *quick, "--out", tmp_path) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "backdoor ASR" in out and "spectral signatures" in out and "activation clustering" in out
    metrics = json.loads((tmp_path / "run.json").read_text())["metrics"]
    table = pd.read_csv(tmp_path / "poison.csv")
    assert table["rate"].tolist() == [0, 0.3] and table["poison"].tolist()[0] == 0
    clean = len(choose_roster(ImageFolderDataset(people), 6, include=TARGET).train)  # the campaign's roster (seed 0)
    assert table["poison"].iloc[1] == MakeupBackdoor.poison_count(0.3, clean)
    assert metrics["clean_accuracy"] >= 0.8  # 6 people, fine-tuned FaceNet: an easy closed set
    # The clean model sends no one else to the target, made up or not; the poisoned one sends the made-up photos
    # there, far more than the same photos bare: the trigger is the makeup, not the relabelled people.
    assert metrics["makeup_asr_clean_model"] <= 0.2
    assert metrics["asr@0.3"] >= metrics["makeup_asr_clean_model"] + 0.3
    assert metrics["asr@0.3"] >= metrics["no_makeup_asr@0.3"] + 0.3
    assert metrics["clean_accuracy_drop@0.3"] == pytest.approx(table["clean_accuracy_drop"].iloc[1])
    assert 0 < metrics["trigger_mean_change"] < 0.01 and metrics["trigger_max_change"] < 0.6
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert curve["norm"].unique().tolist() == ["poison"]
    assert curve["accuracy"].tolist() == pytest.approx((1 - table["asr"]).tolist())
    assert (tmp_path / "makeup-backdoor-faces.png").stat().st_size > 30_000


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--identity", "Bill_Gatez"), "Did you mean 'Bill_Gates'"),
        (("--identity", TARGET, "--eps", "0,0.6"), "poison rates"),
        (("--identity", TARGET, "--threat", "dodging"), "supports --threat identification"),
        (("--identity", TARGET, "--target", "arcface"), "--option cut= to train the head alone"),
    ],
)
def test_bad_input_is_one_clear_line(people, cli, tmp_path, capsys, extra, message):
    command = ("run", "--target", "facenet", "--attack", "makeup-backdoor", "--data", people)
    assert cli(*command, *extra, "--out", tmp_path) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
