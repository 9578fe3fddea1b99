"""The closed-set identification model that inversion and poisoning campaigns attack."""

from __future__ import annotations

import pytest
import torch

from redteam.errors import RedteamError
from redteam.identification import FitConfig, build_identifier, enrol, fit


@pytest.fixture(scope="module")
def enrolment(faces):
    return enrol(faces, identities=8, held_out=2, seed=3, include="Bill_Gates")


def test_enrolment_keeps_test_photos_apart_and_includes_the_named_person(faces, enrolment):
    assert len(enrolment.names) == 8 and "Bill_Gates" in enrolment.names
    assert not set(enrolment.train) & set(enrolment.test)
    for index, label in zip(enrolment.train + enrolment.test, enrolment.train_labels + enrolment.test_labels):
        assert faces.records[index].identity == enrolment.names[label]
    assert enrolment.test_labels.count(enrolment.label("Bill_Gates")) == 2
    assert enrol(faces, 8, 2, seed=3, include="Bill_Gates") == enrolment
    assert enrol(faces, 8, 2, seed=4, include="Bill_Gates").names != enrolment.names


def test_enrolment_errors_are_one_line(faces):
    with pytest.raises(RedteamError, match="not in"):
        enrol(faces, 8, include="Nobody_Here")
    with pytest.raises(RedteamError, match="people with"):
        enrol(faces, 10_000)


def test_head_identifies_held_out_photos_and_training_lowers_the_loss(facenet, faces, enrolment):
    images, labels = faces.load(list(enrolment.train)), torch.tensor(enrolment.train_labels)
    held_out, held_labels = faces.load(list(enrolment.test)), torch.tensor(enrolment.test_labels)
    model = build_identifier(facenet, images, labels, len(enrolment.names))
    nearest_mean_accuracy = (model.predict(held_out) == held_labels).float().mean()
    losses = fit(model, images, labels, FitConfig(epochs=5, seed=0))
    assert losses[-1] < losses[0]
    assert (model.predict(held_out) == held_labels).float().mean() >= max(nearest_mean_accuracy - 0.07, 0.8)
    assert not model.directions.requires_grad
    # a shuffled head is no identifier: the test can fail
    model.directions.data = model.directions.data.roll(1, dims=0)
    assert (model.predict(held_out) == held_labels).float().mean() < 0.3
