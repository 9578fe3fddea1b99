"""Universal adversarial perturbation: learned on some people, judged on others; one perturbation for every face.

A short run on real faces must unmatch held-out genuine pairs far more than random noise of the same norm; the
perturbation must respect its budget; the two sets of identities must be disjoint; the same seed must give the same
perturbation."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest
import torch

from redteam.api import CampaignContext
from redteam.attacks.uap import UAP

QUICK = ("--limit", "8", "--option", "learn_faces=16", "--option", "epochs=2", "--option", "batch=8")


@pytest.fixture(scope="module")
def people(faces_root, tmp_path_factory):
    """20 identities of the evaluation faces, symlinked: 10 to learn on, 10 held out."""
    root = tmp_path_factory.mktemp("uap_faces")
    for identity in sorted(p for p in faces_root.iterdir() if p.is_dir())[:20]:
        (root / identity.name).symlink_to(identity, target_is_directory=True)
    return root


def context_for(dataset, target=None, seed: int = 0, limit: int | None = None) -> CampaignContext:
    return CampaignContext(
        target=target, target_name="facenet", dataset=dataset, device=torch.device("cpu"), out=None, seed=seed,
        limit=limit,
    )  # fmt: skip


def test_learning_and_held_out_identities_are_disjoint_and_seeded(faces):
    split = UAP(learn_faces=100).split(context_for(faces, limit=50))
    assert not split.learning_identities & split.held_out_identities
    assert split.learning_identities | split.held_out_identities == set(faces.by_identity)
    assert abs(len(split.learning_identities) - len(split.held_out_identities)) <= 1
    identity = [record.identity for record in faces.records]
    assert len(split.learning) == 100 and len(split.held_out) == 50
    assert {identity[p.image] for p in split.learning} <= split.learning_identities
    assert {identity[p.image] for p in split.held_out} <= split.held_out_identities
    assert all(identity[p.image] == identity[p.reference] != p.image for p in split.held_out)  # genuine pairs
    assert len({identity[p.image] for p in split.held_out}) == 50  # a prefix spreads over people
    again, other = UAP(learn_faces=100).split(context_for(faces, limit=50)), UAP().split(context_for(faces, seed=1))
    assert again == split
    assert other.learning_identities != split.learning_identities


def test_the_perturbation_is_seeded_and_within_its_budget(facenet, small_faces):
    uap = UAP(epochs=1, batch=4)
    context = context_for(small_faces, facenet)
    probes = uap.split(context).learning[:8]
    threat = uap.enrolled(context, facenet, probes)

    def learn(norm: str, eps: float, seed: int = 0) -> torch.Tensor:
        return uap.learn(context_for(small_faces, facenet, seed), threat, probes, UAP.budget(norm, eps))

    delta = learn("linf", 4)  # /255
    assert delta.shape == (1, 3, 250, 250)
    assert delta.abs().max() == pytest.approx(4 / 255)  # sign steps reach the box's boundary and stay inside it
    assert torch.equal(delta, learn("linf", 4))
    assert not torch.equal(delta, learn("linf", 4, seed=1))  # another seed, another order of the faces
    assert 0.5 < learn("l2", 1.0).norm() <= 1.0 + 1e-5


def test_cli_run_beats_noise_on_held_out_people_and_writes_its_files(people, cli, tmp_path):
    command = ("run", "--target", "facenet", "--attack", "uap", "--data", people, "--eps", "0,16", *QUICK)
    assert cli(*command, "--option", "transfer=facenet,arcface", "--out", tmp_path) == 0
    metrics = json.loads((tmp_path / "run.json").read_text())["metrics"]
    assert metrics["held_out_pairs"] == 8 and metrics["learning_faces"] == 16 and metrics["eps"] == 16
    assert metrics["learning_identities"] + metrics["held_out_identities"] <= 20
    # The same norm, added to the same photos; only the learned one was aimed, at other people.
    assert metrics["uap_similarity"] < metrics["noise_similarity"] - 0.1, metrics
    assert metrics["fooling_rate"] >= metrics["noise_fooling_rate"] + 0.25, metrics
    saved = torch.load(tmp_path / "uap.pt")
    assert saved["norm"] == "linf" and saved["uap"].abs().max() <= 16 / 255 + 1e-6
    assert metrics["uap_linf"] == pytest.approx(16, abs=1e-3)

    pairs = pd.read_csv(tmp_path / "held_out.csv")
    assert len(pairs) == 8 and (pairs["uap"] < pairs["noise"]).mean() >= 6 / 8
    matched = (pairs["clean"] >= metrics["threshold"]).mean()
    assert pairs["fooled"].mean() == pytest.approx(metrics["fooling_rate"] * matched)
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert curve["norm"].tolist() == ["linf", "linf"] and curve["eps"].tolist() == [0, 16] and (curve["n"] == 8).all()
    assert curve["accuracy"].iloc[1] == pytest.approx(metrics["accuracy"])
    transfer = pd.read_csv(tmp_path / "transfer.csv").set_index("target")
    assert transfer.index.tolist() == ["facenet", "arcface"]
    assert transfer.loc["facenet", "fooling_rate"] == pytest.approx(metrics["fooling_rate"])
    assert (tmp_path / "uap.png").stat().st_size > 20_000 and (tmp_path / "uap-faces.png").stat().st_size > 50_000

    # The pairs the UAP unmatched are in the evidence log: probe plus UAP, as files that are what they say.
    entries = [json.loads(line) for line in (tmp_path / "evidence.jsonl").read_text().splitlines()]
    assert [e["score"] for e in entries] == pytest.approx(pairs.loc[pairs["fooled"], "uap"].tolist()) != []
    for entry in entries:
        assert (entry["attack"], entry["eps"], entry["threshold"]) == ("uap", 16, metrics["threshold"])
        assert entry["identity"] == entry["reference"] and entry["linf"] == pytest.approx(16 / 255, abs=1e-6)
        assert abs(entry["saved_score"] - entry["score"]) < 0.02
        assert entry["saved_fooled"] == (entry["saved_score"] < entry["threshold"])
        assert hashlib.sha256((tmp_path / entry["image"]).read_bytes()).hexdigest() == entry["sha256"]


def test_through_a_face_system_it_says_where_the_system_stopped_each_probe(people, cli, capsys, tmp_path):
    """Learned and judged on raw photos through ``mtcnn+arcface``: each held-out probe's stage is stored beside its
    similarity, and a probe is matched exactly when its similarity reaches the threshold with its face found."""
    command = ("run", "--target", "mtcnn+arcface", "--attack", "uap", "--data", people, "--eps", "0,16")
    quick = ("--limit", "6", "--option", "learn_faces=8", "--option", "epochs=1", "--option", "batch=8")
    assert cli(*command, *quick, "--option", "transfer=", "--out", tmp_path) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "where mtcnn+arcface stopped the held-out probes with the UAP: no face" in printed
    metrics = json.loads((tmp_path / "run.json").read_text())["metrics"]
    pairs = pd.read_csv(tmp_path / "held_out.csv")
    assert set(pairs["stage"]) <= {"no face", "no match", "match"} and len(pairs) == 6
    assert ((pairs["stage"] == "match") == (pairs["uap"] >= metrics["threshold"])).all()
    assert metrics["uap_matched"] == pytest.approx((pairs["stage"] == "match").mean())
    assert metrics["uap_face_found"] == pytest.approx((pairs["stage"] != "no face").mean())
    assert metrics["clean_face_found"] == 1 and metrics["uap_matched"] == pytest.approx(metrics["accuracy"])


@pytest.mark.parametrize(
    "extra,message",
    [
        (("--threat", "impersonation"), "supports --threat dodging"),
        (("--norm", "area"), "--norm must be linf or l2"),
        (("--option", "transfer=mtcnn"), "is a detection model"),
        (("--option", "transfer=facenett"), "Did you mean 'facenet'"),
        (("--eps", "0"), "a budget above 0"),
    ],
)
def test_bad_input_is_one_clear_line(people, cli, tmp_path, capsys, extra, message):
    assert cli("run", "--target", "facenet", "--attack", "uap", "--data", people, *extra, "--out", tmp_path) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
