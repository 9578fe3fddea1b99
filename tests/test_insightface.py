"""InsightFace recognisers from users' files: the two real MobileFaceNet ONNX files equal onnxruntime on real aligned
crops and tell LFW identities apart through ``ArcFace(weights=...)``; arcface_torch ``backbone.pth`` state dicts (plain,
or wrapped with DDP prefixes in fp16) and a ``torch.onnx`` export of the same randomly initialised IResNet-18 (files
of the format of w600k_r50 & co., which are not available here) reproduce the module; bad files give one clear
RedteamError each."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from helpers import shared_path
from torch import Tensor, nn

from redteam.errors import RedteamError
from redteam.metrics import verification_report
from redteam.targets.arcface import INSIGHTFACE_CROP, ArcFace
from redteam.targets.insightface import IResNet, load_insightface_backbone

ort = pytest.importorskip("onnxruntime", reason="the parity tests need onnxruntime (pip install onnxruntime)")

RECOGNISERS = ["arcface.onnx", "mobilefacenet.onnx"]  # MobileFaceNets from ../shared/weights (see its README)
IDENTITIES = 12  # evaluation identities whose first two photos make the separation test's pairs


def onnxruntime_session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnxruntime(path, x: Tensor, raw_pixels: bool) -> np.ndarray:
    """onnxruntime on ``x`` (InsightFace's ``(255 x - 127.5) / 127.5``), given raw pixels where the graph wants them."""
    session = onnxruntime_session(path)
    feed = x * 127.5 + 127.5 if raw_pixels else x
    return session.run(None, {session.get_inputs()[0].name: feed.numpy()})[0]


@pytest.fixture(scope="module")
def crops(faces) -> Tensor:
    """8 LFW faces warped onto InsightFace's template and scaled as its recognisers expect."""
    return INSIGHTFACE_CROP(faces.load(range(0, 3400, 425)), (112, 112)) * 2 - 1


def random_iresnet18() -> IResNet:
    """An IResNet-18 with random weights and non-trivial batch-norm statistics and PReLU slopes (a fresh module has
    mean 0 / variance 1 / slope 0.25 everywhere, which would hide mix-ups between them)."""
    torch.manual_seed(0)
    model = IResNet((2, 2, 2, 2))
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
        elif isinstance(module, nn.PReLU):
            nn.init.uniform_(module.weight, 0.05, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def iresnet() -> IResNet:
    return random_iresnet18()


@pytest.fixture(scope="module")
def probe(iresnet) -> tuple[Tensor, Tensor]:
    """Two inputs in InsightFace's range and the random IResNet's embeddings of them."""
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    with torch.no_grad():
        return x, iresnet(x)


@pytest.mark.parametrize("name", RECOGNISERS)
def test_real_onnx_recognisers_match_onnxruntime(name, crops):
    path = shared_path("weights", name)
    backbone = load_insightface_backbone(path)
    with torch.no_grad():
        ours = backbone(crops).numpy()
    reference = run_onnxruntime(path, crops, backbone.raw_pixels)
    assert ours.shape == reference.shape == (8, 128)
    assert np.abs(ours - reference).max() < 1e-4  # embeddings reach |4|; measured 3e-6 and 1e-5


@pytest.mark.parametrize("name", RECOGNISERS)
def test_real_onnx_recognisers_tell_identities_apart(name, faces):
    """Genuine minus impostor mean cosine is 0.70 and 0.68 here (AUC 1.0). Measured on the same pairs, a wrong input
    scale (raw pixels: 0.04 / 0.09) or framing (the whole image resized: 0.24 / 0.15; the template 8 px lower: 0.56 /
    0.41) fails this; BGR order or [0, 1] inputs hardly matter to these models (0.61 to 0.69) and would pass."""
    target = ArcFace(weights=shared_path("weights", name)).eval()
    identities = sorted(faces.by_identity)[:IDENTITIES]
    with torch.no_grad():
        embeddings = target.embed(faces.load([i for person in identities for i in faces.by_identity[person][:2]]))
    similarity = target.similarity_matrix(embeddings[0::2], embeddings[1::2]).numpy()
    genuine, impostor = np.diag(similarity), similarity[~np.eye(IDENTITIES, dtype=bool)]
    assert verification_report(genuine, impostor).auc > 0.97
    assert genuine.mean() - impostor.mean() > 0.5


def test_state_dict_files_load_exactly(iresnet, probe, tmp_path):
    x, expected = probe
    state = iresnet.state_dict()
    torch.save(state, tmp_path / "backbone.pth")
    loaded = load_insightface_backbone(tmp_path / "backbone.pth")
    assert isinstance(loaded, IResNet) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)

    # A training checkpoint: the backbone nested, saved from DistributedDataParallel, in half precision.
    wrapped = {"state_dict_backbone": {f"module.{k}": v.half() for k, v in state.items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "checkpoint.pt")
    loaded = load_insightface_backbone(tmp_path / "checkpoint.pt")
    assert loaded.state_dict().keys() == state.keys()
    for key, value in loaded.state_dict().items():  # same module class as above: equal weights, equal function
        assert value.dtype == state[key].dtype and torch.equal(value, state[key].half().to(value.dtype)), key


class _RawPixels(nn.Module):
    """InsightFace's in-graph normalisation: ``(x - 127.5) * (1 / 127.5)`` on pixels in ``[0, 255]``."""

    def forward(self, x: Tensor) -> Tensor:
        return (x - 127.5) * (1 / 127.5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter warns about itself
@pytest.mark.parametrize("normalises_inside", [False, True])
def test_onnx_export_of_an_iresnet_matches_onnxruntime(iresnet, probe, tmp_path, normalises_inside):
    """A torch.onnx export, as arcface_torch makes w600k_r50.onnx-style files; with ``normalises_inside`` the graph
    starts with Sub and Mul and takes raw pixels, like InsightFace's MXNet exports.

    torch 2.13's default exporter (dynamo) needs onnxscript, which is not installed: the TorchScript one is used."""
    model = nn.Sequential(_RawPixels(), iresnet).eval() if normalises_inside else iresnet
    path = tmp_path / "iresnet18.onnx"
    example = torch.zeros(1, 3, 112, 112)
    torch.onnx.export(model, (example,), path, dynamo=False, input_names=["data"], dynamic_axes={"data": {0: "n"}})

    backbone = load_insightface_backbone(path)
    assert backbone.raw_pixels == normalises_inside and not backbone.training
    x, expected = probe
    with torch.no_grad():
        ours = backbone(x).numpy()
    reference = run_onnxruntime(path, x, normalises_inside)
    assert ours.shape == reference.shape == (2, 512)
    # Float32 rounding in different operation orders (batch norms folded into convolutions): measured 3e-6 of the
    # embedding range (~1) between any two of the three.
    assert np.abs(ours - reference).max() < 2e-5 * np.abs(reference).max()
    assert np.abs(ours - expected.numpy()).max() < 2e-5 * np.abs(reference).max()


def test_bad_files_give_one_clear_error(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(RedteamError, match="neither an ONNX model nor a PyTorch state dict"):
        load_insightface_backbone(junk)

    # Bytes that open like a pickle: torch.load refuses them with its own errors, which must not reach the user.
    pickle_junk = tmp_path / "junk.pth"
    pickle_junk.write_bytes(b"\x80\x02" + np.random.default_rng(1).bytes(4096))
    with pytest.raises(RedteamError, match=r"cannot be read as tensors by torch\.load\(weights_only=True\)"):
        load_insightface_backbone(pickle_junk)

    whole_model = tmp_path / "model.pth"
    torch.save(IResNet((1, 1, 1, 1), num_features=8), whole_model)  # the module pickled, not its state dict
    with pytest.raises(RedteamError, match=r"whole model; save the backbone's state_dict\(\)"):
        load_insightface_backbone(whole_model)

    # MobileFaceNet_Pytorch's training checkpoint: a real PyTorch file of another architecture.
    with pytest.raises(RedteamError, match=r"not an arcface_torch IResNet state dict .* found epoch, net_state_dict"):
        load_insightface_backbone(shared_path("weights", "068.ckpt"))

    truncated = IResNet((1, 1, 1, 1), num_features=8).state_dict()
    del truncated["bn2.weight"]
    torch.save(truncated, tmp_path / "truncated.pth")
    with pytest.raises(RedteamError, match=r"does not fit arcface_torch's IResNet .*bn2\.weight"):
        load_insightface_backbone(tmp_path / "truncated.pth")

    # A detector (any input size, nine outputs) and a recogniser for another crop size.
    with pytest.raises(RedteamError, match="a recogniser gives one embedding; this graph has 9 outputs"):
        load_insightface_backbone(shared_path("weights", "scrfd_500m.onnx"))
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Flatten", ["data"], ["embedding"])],
        "wrong_size",
        [onnx.helper.make_tensor_value_info("data", onnx.TensorProto.FLOAT, [1, 3, 160, 160])],
        [onnx.helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, [1, 76800])],
    )
    onnx.save(onnx.helper.make_model(graph), tmp_path / "facenet160.onnx")
    with pytest.raises(RedteamError, match=r"input \[1, 3, 160, 160\] is not InsightFace's \[batch, 3, 112, 112\]"):
        load_insightface_backbone(tmp_path / "facenet160.onnx")
