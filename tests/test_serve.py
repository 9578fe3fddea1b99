"""The reference face service, started as a user starts it (`redteam serve` on 127.0.0.1, a free port) and spoken
to over HTTP: its decisions are the model's, a decision-only service never shows a score, uploads are checked with
4xx answers that say why, the API key is required and never echoed, and the rate limit answers 429 with
Retry-After."""

from __future__ import annotations

import io
import math
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pandas as pd
import pytest
import torch
from PIL import Image

from redteam.datasets import ImageFolderDataset
from redteam.engine import load_target

KEY = "s3cret-key-for-tests"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "remote"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_service(expose: str, *options: str) -> Iterator[tuple[httpx.Client, int]]:
    """`redteam serve --target facenet` with the given exposure and options, on a free port, until the block ends."""
    port = _free_port()
    command = [str(Path(sys.executable).parent / "redteam"), "serve", "--target", "facenet", "--expose", expose,
               "--port", str(port), "--api-key-env", "RT_TEST_KEY", "--device", "cpu", *options]  # fmt: skip
    environment = {**os.environ, "RT_TEST_KEY": KEY, "OMP_NUM_THREADS": "1"}
    running = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": KEY}, timeout=60)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert running.poll() is None, running.stdout.read() if running.stdout else "the service exited"
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not come up in 180 s"
            time.sleep(0.5)
        yield client, port
    finally:
        client.close()
        running.terminate()
        output = running.communicate(timeout=30)[0]
        assert KEY not in output  # the key is never printed


@pytest.fixture(scope="module")
def service(request) -> Iterator[tuple[httpx.Client, int]]:
    """A service with the test's parameters (exposure, options), shared by the module's tests that ask the same."""
    with running_service(*request.param) as running:
        yield running


@pytest.fixture(scope="module")
def people(faces_root) -> tuple[list[Path], list[Path]]:
    """Two photos each of two people of the evaluation faces."""
    dataset = ImageFolderDataset(faces_root)
    names = [n for n, photos in dataset.by_identity.items() if len(photos) >= 2][:2]
    return tuple([Path(dataset.records[i].source) for i in dataset.by_identity[n][:2]] for n in names)  # type: ignore[return-value]


def _files(**paths: Path) -> dict[str, tuple[str, bytes, str]]:
    return {field: (path.name, path.read_bytes(), "image/jpeg") for field, path in paths.items()}


def _in_process(first: Path, second: Path) -> float:
    """facenet's similarity of two photos, computed here as the service should."""
    model = load_target("facenet", torch.device("cpu"))
    dataset = ImageFolderDataset(first.parent.parent)
    index = {record.source: k for k, record in enumerate(dataset.records)}
    with torch.no_grad():
        embeddings = model.embed(dataset.load([index[str(first)], index[str(second)]]))
    return float(model.similarity(embeddings[:1], embeddings[1:])[0])


def test_onnxruntime_embeddings_answer_with_the_models_scores(people):
    """`redteam serve --forward onnxruntime`: the same scores as the model computed here on torch."""
    (a1, a2), (b1, _) = people
    with running_service("score", "--forward", "onnxruntime") as (client, _):
        for first, second in ((a1, a2), (a1, b1)):
            answer = client.post("/verify", files=_files(image=first, other=second)).json()
            assert answer["score"] == pytest.approx(_in_process(first, second), abs=1e-4)


@pytest.mark.parametrize("service", [("score",)], indirect=True)
def test_scores_are_the_models_and_the_gallery_answers(service, people):
    client, _ = service
    (a1, a2), (b1, b2) = people
    genuine = client.post("/verify", files=_files(image=a1, other=a2)).json()
    impostor = client.post("/verify", files=_files(image=a1, other=b1)).json()
    assert genuine["score"] == pytest.approx(_in_process(a1, a2), abs=1e-4)
    assert impostor["score"] == pytest.approx(_in_process(a1, b1), abs=1e-4)
    assert genuine["match"] == (genuine["score"] >= genuine["threshold"]) and genuine["match"]
    assert not impostor["match"]
    for name, photo in (("a", a1), ("b", b1)):
        assert client.post("/enrol", data={"identity": name}, files=_files(image=photo)).status_code == 200
    assert client.post("/verify", data={"identity": "a"}, files=_files(image=a2)).json()["match"]
    assert client.post("/identify", files=_files(image=b2)).json()["identity"] == "b"
    assert client.post("/verify", data={"identity": "nobody"}, files=_files(image=a2)).status_code == 404


@pytest.mark.parametrize("service", [("decision", "--rate", "2/s")], indirect=True)
def test_a_decision_service_shows_no_score_checks_uploads_and_limits_the_rate(service, people, tmp_path):
    client, _ = service
    (a1, a2), (b1, _) = people
    time.sleep(1.5)  # a full bucket
    answer = client.post("/verify", files=_files(image=a1, other=a2))
    assert answer.status_code == 200 and answer.json() == {"match": True}
    assert client.post("/verify", files=_files(image=a1, other=b1)).json() == {"match": False}

    def refused(files, status: int, why: str) -> None:
        time.sleep(0.6)  # room under the rate limit
        reply = client.post("/verify", files=files)
        assert reply.status_code == status and why in reply.json()["detail"], reply.text

    grey = io.BytesIO()
    Image.new("L", (64, 64)).save(grey, format="PNG")
    refused({"image": ("notes.txt", b"hello", "text/plain"), "other": _files(image=a2)["image"]}, 415, "content type")
    refused({"image": ("broken.jpg", b"\xff\xd8 not a jpeg", "image/jpeg"), **_files(other=a2)}, 422, "cannot read")
    refused({"image": ("grey.png", grey.getvalue(), "image/png"), **_files(other=a2)}, 422, "grayscale")
    refused({"image": ("huge.png", b"\x89PNG" + bytes(6 * 2**20), "image/png"), **_files(other=a2)}, 413, "MiB")
    refused(_files(image=a1), 422, "either a second image")
    time.sleep(0.6)
    assert client.get("/health", headers={"X-API-Key": ""}).status_code == 401  # no key
    statuses = [client.get("/health") for _ in range(6)]
    limited = [reply for reply in statuses if reply.status_code == 429]
    assert limited and all(int(reply.headers["Retry-After"]) >= 1 for reply in limited)
    assert all(KEY not in reply.text for reply in statuses)


def test_bad_service_options_fail_in_one_line(cli, capsys, monkeypatch):
    monkeypatch.delenv("RT_UNSET_KEY", raising=False)
    for args, message in (
        (("--rate", "fast"), "--rate 'fast'"),
        (("--api-key-env", "RT_UNSET_KEY"), "unset or empty"),
        (("--target", "mtcnn"), "is a detector"),
    ):
        assert cli("serve", *args) == 2
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error, error


def _spec(folder: Path, example: str, port: int) -> Path:
    """A shipped example spec pointed at the test's port, written into ``folder``."""
    text = (EXAMPLES / example).read_text().replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / example
    spec.write_text(text.replace("REDTEAM_API_KEY", "RT_TEST_KEY"))
    return spec


@pytest.mark.parametrize("service", [("decision", "--forward", "onnxruntime")], indirect=True)
def test_a_query_attack_through_the_wire_equals_one_in_process(service, cli, capsys, monkeypatch, faces_root, tmp_path):
    """`redteam run --target remote:<spec>` against the decision service gives what `--target facenet --access
    decision` gives in-process, to the last bit: every query crosses the wire as the 8 bits the oracle answers
    in-process, and onnxruntime embeds a face alike alone (the service) or in a batch (here). The attack shrinks a
    start within its query budget, and the key appears nowhere in the run folder."""
    _, port = service
    monkeypatch.setenv("RT_TEST_KEY", KEY)
    spec = _spec(tmp_path, "reference-decision.yaml", port)
    common = ("--attack", "hsj", "--queries", 60, "--limit", 2, "--data", faces_root, "--no-checks")
    assert cli("run", "--target", f"remote:{spec}", *common, "--out", tmp_path / "remote") == 0
    assert cli("run", "--target", "facenet", "--access", "decision", "--forward", "onnxruntime", *common,
               "--out", tmp_path / "local") == 0  # fmt: skip
    capsys.readouterr()
    tables = []
    for run in ("remote", "local"):
        with sqlite3.connect(tmp_path / run / "results.sqlite") as db:
            tables.append(pd.read_sql_query("SELECT probe, size, score, linf, l2, queries FROM minimal", db))
    remote, local = (table.drop(columns="score") for table in tables)  # the API's score is its decision only
    pd.testing.assert_frame_equal(remote, local)
    assert remote["queries"].between(1, 60).all() and len(remote) == 2
    assert remote["size"].map(math.isfinite).all()  # a start was found for each probe, and shrunk
    for file in (tmp_path / "remote").rglob("*"):
        assert not file.is_file() or KEY.encode() not in file.read_bytes(), file


@pytest.mark.parametrize("service", [("score",)], indirect=True)
def test_probe_reads_a_spec_right_and_catches_a_wrong_one(service, cli, capsys, monkeypatch, faces_root, tmp_path):
    """`redteam probe` on the score example: the genuine pair reads as the same person, the impostor as not; a spec
    that reads the threshold field as the score fails in one line before any attack."""
    _, port = service
    monkeypatch.setenv("RT_TEST_KEY", KEY)
    spec = _spec(tmp_path, "reference-score.yaml", port)
    assert cli("probe", spec, "--data", faces_root) == 0
    printed = capsys.readouterr().out
    assert "genuine pair: score = " in printed and "impostor pair" in printed and "as expected" in printed
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(spec.read_text().replace("answer: score", "answer: threshold"))
    assert cli("probe", wrong, "--data", faces_root) == 2
    assert "impostor pair came out wrong" in capsys.readouterr().err


@pytest.mark.parametrize(
    "service, example",
    [
        (("score", "--reply", "matches"), "vendor-matches.yaml"),
        (("score", "--reply", "confidence"), "vendor-confidence.yaml"),
    ],
    indirect=["service"],
)
def test_commercial_answer_shapes_are_read_right(service, example, cli, capsys, monkeypatch, faces_root, tmp_path):
    """The shipped specs for two commercial answer shapes, against their local stand-ins: probe reads each right;
    a list of matches that leaves the impostor out reads as no match only with ``missing``; a vendor stating a
    threshold other than the spec's stops the run in one line."""
    _, port = service
    monkeypatch.setenv("RT_TEST_KEY", KEY)
    spec = _spec(tmp_path, example, port)
    assert cli("probe", spec, "--data", faces_root) == 0
    assert "as expected" in capsys.readouterr().out
    changed = tmp_path / "changed.yaml"
    if example == "vendor-matches.yaml":  # the vendor's own cut-off: the impostor is not listed at all
        changed.write_text(spec.read_text().replace(', similarity_threshold: "0"', "").replace("missing: 0\n", ""))
        message = "is not in the reply {'matches': []}"
    else:
        changed.write_text(spec.read_text().replace("threshold: 97.639", "threshold: 90"))
        message = "the API decides at 97.639 (thresholds.1e-3), the spec at threshold 90"
    assert cli("probe", changed, "--data", faces_root) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error, error


@pytest.mark.parametrize("service", [("score",)], indirect=True)
def test_a_vendor_tool_is_a_target(service, cli, capsys, monkeypatch, faces_root, tmp_path):
    """`--target exec:tool.yaml`: a command-line tool (a stand-in that asks the score service and prints a 0-100
    confidence) given image files, its output read at the spec's answer: probe reads it right, and a score attack
    runs through it within its query budget."""
    _, port = service
    monkeypatch.setenv("RT_TEST_KEY", KEY)
    tool = Path(__file__).parent / "fixtures" / "vendor_cli.py"
    spec = tmp_path / "tool.yaml"
    spec.write_text(
        f"command: [{sys.executable}, {tool}, --port, '{port}', $PROBE, $REFERENCE]\n"
        "answer: result.confidence\nmeaning: confidence\nthreshold: 44.69\n"
    )
    assert cli("probe", spec, "--data", faces_root) == 0
    assert "as expected" in capsys.readouterr().out
    run = ("run", "--target", f"exec:{spec}", "--attack", "square", "--queries", 4, "--eps", "0,8", "--limit", 2)
    assert cli(*run, "--data", faces_root, "--no-checks", "--out", tmp_path / "run") == 0
    with sqlite3.connect(tmp_path / "run" / "results.sqlite") as db:
        rows = pd.read_sql_query("SELECT eps, queries FROM results", db)
    assert len(rows) == 4 and rows.loc[rows["eps"] > 0, "queries"].between(1, 4).all()


@pytest.mark.parametrize("service", [("decision", "--faults", "500:0.2,429:0.06,slow:0.04")], indirect=True)
def test_faults_are_survived_and_change_nothing(service, cli, capsys, monkeypatch, faces_root, tmp_path):
    """Against a service that answers 20% of requests 500, 6% 429 and 4% too slowly (past the spec's timeout),
    with four requests in flight at once, the attack completes: retries stay below the oracle, so every query is
    counted once and the results equal a run against a fault-free service, one request at a time, with the same
    seed."""
    client, port = service
    monkeypatch.setenv("RT_TEST_KEY", KEY)
    common = ("--attack", "hsj", "--queries", 12, "--limit", 2, "--data", faces_root, "--no-checks")
    results = []
    with running_service("decision") as (_, clean_port):
        for name, where in (("faulty", port), ("clean", clean_port)):
            spec = _spec(tmp_path / name, "reference-decision.yaml", where)
            spec.write_text(
                spec.read_text() + "timeout: 2\nretries: 8\n" + ("concurrency: 4\n" if where == port else "")
            )
            assert cli("run", "--target", f"remote:{spec}", *common, "--out", tmp_path / name / "run") == 0
            with sqlite3.connect(tmp_path / name / "run" / "results.sqlite") as db:
                results.append(pd.read_sql_query("SELECT probe, size, l2, queries FROM minimal ORDER BY probe", db))
    capsys.readouterr()
    pd.testing.assert_frame_equal(results[0], results[1])
    assert results[0]["queries"].between(1, 12).all()
    health = next(r for r in (client.get("/health") for _ in range(20)) if r.status_code == 200).json()
    assert set(health["faults injected"]) == {"500", "429", "slow"}  # each kind happened, and was survived


def test_bad_specs_fail_in_one_line(cli, capsys, tmp_path):
    spec = tmp_path / "api.yaml"
    for text, message in (
        ("url: ftp://x\nanswer: a\nmeaning: decision\nfields: {a: $PROBE, b: $REFERENCE}\n", "http:// or https://"),
        ("url: http://x\nanswer: a\nmeaning: similarity\nfields: {a: $PROBE, b: $REFERENCE}\n", "threshold"),
        ("url: http://x\nanswer: a\nmeaning: decision\nfields: {a: $PROBE}\n", "$REFERENCE"),
        ("url: http://x\nanswer: a\nmeaning: decision\nfields: {a: $PROBE, b: $REFERENCE}\nverb: GET\n", "unknown key"),
        ("command: [tool, $PROBE]\nanswer: a\nmeaning: decision\n", "must place both"),
    ):
        spec.write_text(text)
        scheme = "exec" if text.startswith("command") else "remote"
        assert cli("run", "--target", f"{scheme}:{spec}", "--attack", "hsj", "--out", tmp_path / "out") == 2
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error, error


@pytest.mark.parametrize("service", [("decision", "--forward", "onnxruntime")], indirect=True)
def test_kill_9_mid_attack_resumes_from_the_ledger(service, faces_root, tmp_path):
    """`kill -9` while an attack queries the service, then the same command: the ledger answers what was asked
    before, so no request is sent twice (the service counts them), and the results equal an uninterrupted run's."""
    client, port = service
    spec = _spec(tmp_path, "reference-decision.yaml", port)
    command = [str(Path(sys.executable).parent / "redteam"), "run", "--target", f"remote:{spec}", "--attack", "hsj",
               "--queries", "30", "--limit", "2", "--data", str(faces_root), "--no-checks"]  # fmt: skip
    environment = {**os.environ, "RT_TEST_KEY": KEY, "OMP_NUM_THREADS": "1"}

    def comparisons() -> int:
        return client.get("/health").json()["comparisons"]

    def ledger(run: Path) -> int:
        """Requests kept in the run's ledger so far (0 while the run is still creating its store)."""
        if not (run / "results.sqlite").is_file():
            return 0
        try:
            with sqlite3.connect(run / "results.sqlite") as db:
                return db.execute("SELECT count(*) FROM ledger").fetchone()[0]
        except sqlite3.OperationalError:  # the file exists, its tables not yet
            return 0

    before = comparisons()
    subprocess.run([*command, "--out", str(tmp_path / "whole")], env=environment, check=True, capture_output=True)
    whole = comparisons() - before
    assert whole == ledger(tmp_path / "whole") > 30  # every request sent once, and kept

    before = comparisons()
    killed = subprocess.Popen([*command, "--out", str(tmp_path / "parts")], env=environment,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while killed.poll() is None and time.monotonic() < deadline:
        if ledger(tmp_path / "parts") >= whole // 2:
            killed.kill()  # SIGKILL: nothing is flushed or closed
            break
        time.sleep(0.05)
    killed.wait()
    assert killed.returncode == -9, "the run finished before it could be killed"
    kept = ledger(tmp_path / "parts")
    subprocess.run([*command, "--out", str(tmp_path / "parts")], env=environment, check=True, capture_output=True)
    resent = comparisons() - before - whole
    print(f"ledger: {whole} requests uninterrupted; {kept} kept at kill -9; {ledger(tmp_path / 'parts')} after the "
          f"resume; {resent} sent twice")  # fmt: skip
    assert 0 < kept < whole and ledger(tmp_path / "parts") == whole
    assert resent <= 1  # at most the request in flight at the kill is asked again
    tables = []
    for run in ("whole", "parts"):
        with sqlite3.connect(tmp_path / run / "results.sqlite") as db:
            tables.append(pd.read_sql_query("SELECT probe, size, l2, queries FROM minimal ORDER BY probe", db))
    pd.testing.assert_frame_equal(tables[0], tables[1])
    with sqlite3.connect(tmp_path / "parts" / "results.sqlite") as db:
        hits = db.execute("SELECT sum(hits) FROM ledger").fetchone()[0]
    assert hits >= kept - 1  # the resumed run replayed what was kept from the ledger
    report = subprocess.run([str(Path(sys.executable).parent / "redteam"), "report", str(tmp_path / "parts"),
                             "--examples", "0"], env=environment, capture_output=True, text=True)  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert f"{whole} requests sent" in (tmp_path / "parts" / "report.md").read_text()
