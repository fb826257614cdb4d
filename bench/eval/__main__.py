"""``make eval``: the tracker's vision core measured, every number from a run, nothing timed-out.

Sections (tables on stdout, everything in ``bench/results/tracking_eval.json``):

1. Evaluator known answers: TrackEval on TUD-Campus/TUD-Stadtmitte against the shipped
   test.txt, and GT against itself.
2. Tracker only: detections made from TUD GT with seeded noise (``simulate.py``), seeds 0-2,
   ours beside the IoU-only baseline on the same detections; plus ours with simulated
   appearance vectors (a labelled stand-in: TUD ships no images).
3. Map projection: TUD-Stadtmitte foot points to world X, Y; fit on the first half of the
   frames, errors on the second half.
4. Detectors on rendered frames: HOG and, if converted, SSDLite (``convert_ssdlite.py``).
5. Multi-camera (``mtmc.py``): seeded three-camera scenes, per-camera HOTA and global IDF1
   (one id space over all cameras) with external detections (clean, noisy) and with the real
   pipeline (HOG + MobileNetV2 on rendered frames), against the issue's goals.
6. Speed: tracker-only ms/frame at 30 boxes, embedding ms/crop, detector ms/frame at 640x480,
   and end-to-end frames/s per detector (detect + track + embed + Re-ID) for the demo's cameras.

2 cores shared with other work: times are for comparing rows of one run, not absolutes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.eval import mtmc
from bench.eval.mot import (
    SEQUENCES,
    evaluate,
    load_sequence,
    num_frames,
    rows_from_tracks,
)
from bench.eval.simulate import (
    REPORT_SEEDS,
    IouBaselineTracker,
    NoiseModel,
    noisy_detections,
    simulated_embeddings,
)
from edgeway.tracker.scenes import demo_environment, demo_scene, draw_person
from edgeway.tracker.vision.detection import HogDetector, OnnxDetector, tight_hog_box
from edgeway.tracker.vision.homography import fit_homography, foot_points, project_points
from edgeway.tracker.vision.multicam import MultiCameraTracker
from edgeway.tracker.vision.tracking import CameraTracker
from edgeway.tracker.vision.types import CameraSpec, Detection

RESULTS = Path("bench/results/tracking_eval.json")
SSDLITE = Path("var/models/ssdlite_coco.onnx")
IMAGE_SIZE = (640, 480)  # TUD frames are 640 x 480 (MOT15 seqinfo)
METRICS = ("HOTA", "DetA", "AssA", "MOTA", "IDF1", "IDSW")


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, row in enumerate(cells):
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if k == 0:
            print("  ".join("-" * w for w in widths))


def known_answers() -> dict[str, Any]:
    out: dict[str, Any] = {}
    rows = []
    for seq in SEQUENCES:
        gt, shipped = load_sequence(seq)
        n = num_frames(gt)
        res = evaluate(gt, shipped, n)
        self_res = evaluate(gt, gt, n)
        out[seq] = {"shipped": res, "gt_vs_gt": self_res}
        rows.append(
            [
                seq,
                *(f"{res[k]:.2f}" for k in (*METRICS, "FP", "FN", "MT", "ML")),
                f"{self_res['HOTA']:.1f}/{self_res['MOTA']:.1f}/{self_res['IDF1']:.1f}",
            ]
        )
    table(
        "1. Evaluator known answers (TrackEval; GT vs the shipped test.txt)",
        ["sequence", *METRICS, "FP", "FN", "MT", "ML", "GT-vs-GT HOTA/MOTA/IDF1"],
        rows,
    )
    return out


def run_tracker(seq: str, seed: int, kind: str) -> dict[str, float]:
    gt, _ = load_sequence(seq)
    n = num_frames(gt)
    dets = noisy_detections(gt, n, seed, NoiseModel(), IMAGE_SIZE)
    embs = simulated_embeddings(dets, seed) if kind == "ours+sim-appearance" else None
    tracks: dict[int, list[tuple[int, tuple[float, float, float, float]]]] = {}
    if kind == "iou-baseline":
        base = IouBaselineTracker()
        for f in range(1, n + 1):
            tracks[f] = base.update([d.xyxy for d in dets[f]], [d.confidence for d in dets[f]])
    else:
        ours = CameraTracker()
        for f in range(1, n + 1):
            batch = [
                Detection(d.xyxy, d.confidence, None if embs is None else embs[f][i])
                for i, d in enumerate(dets[f])
            ]
            tracks[f] = [(o.track_id, o.bbox_xyxy) for o in ours.update(batch)]
    return evaluate(gt, rows_from_tracks(tracks), n)


def tracker_only() -> dict[str, Any]:
    kinds = ("ours", "iou-baseline", "ours+sim-appearance")
    res = {
        seq: {k: [run_tracker(seq, s, k) for s in REPORT_SEEDS] for k in kinds} for seq in SEQUENCES
    }
    rows = []
    for seq in SEQUENCES:
        for k in kinds:
            runs = res[seq][k]
            cells = []
            for m in METRICS:
                v = np.array([r[m] for r in runs])
                cells.append(
                    f"{v.mean():.1f} ± {v.std():.1f}" if m != "IDSW" else f"{v.mean():.1f}"
                )
            rows.append([seq, k, *cells])
    table(
        f"2. Tracker only: TUD GT with seeded noise {NoiseModel()}, "
        f"seeds {REPORT_SEEDS}, mean ± std",
        ["sequence", "tracker", *METRICS],
        rows,
    )
    verdict = []
    for seq in SEQUENCES:
        gains = [
            o["HOTA"] - b["HOTA"]
            for o, b in zip(res[seq]["ours"], res[seq]["iou-baseline"], strict=True)
        ]
        verdict.append(
            [seq, " ".join(f"{g:+.1f}" for g in gains), "yes" if min(gains) >= 3.0 else "NO"]
        )
    table(
        "   HOTA gain of ours over the baseline, per seed (goal: >= +3 on every seed)",
        ["sequence", "per seed", "met"],
        verdict,
    )
    return {
        "noise": NoiseModel().__dict__ if hasattr(NoiseModel(), "__dict__") else repr(NoiseModel()),
        "seeds": REPORT_SEEDS,
        "runs": res,
        "gains": verdict,
    }


def map_projection() -> dict[str, Any]:
    gt, _ = load_sequence("TUD-Stadtmitte")
    n = num_frames(gt)
    split = n // 2
    train = [r for r in gt if r.frame <= split]
    test = [r for r in gt if r.frame > split]
    img_train = foot_points([r.xyxy for r in train])
    map_train = np.array([[r.world_x, r.world_y] for r in train])
    img_test = foot_points([r.xyxy for r in test])
    map_test = np.array([[r.world_x, r.world_y] for r in test])
    out: dict[str, Any] = {"train_pairs": len(train), "test_pairs": len(test), "split_frame": split}
    rows = []
    for label, thr in (("RANSAC 5.0 (SpotOn's value)", 5.0), ("RANSAC 0.25 m", 0.25)):
        h = fit_homography(img_train, map_train, ransac_threshold=thr)
        err = np.linalg.norm(project_points(h, img_test) - map_test, axis=1)
        stats = {
            "median_m": float(np.median(err)),
            "p90_m": float(np.percentile(err, 90)),
            "max_m": float(err.max()),
        }
        out[label] = stats
        rows.append(
            [
                label,
                f"{stats['median_m']:.3f}",
                f"{stats['p90_m']:.3f}",
                f"{stats['max_m']:.3f}",
                "yes" if stats["median_m"] <= 0.10 else "NO",
            ]
        )
    table(
        f"3. Map projection, TUD-Stadtmitte: fit frames 1-{split} ({len(train)} pairs), "
        f"test {split + 1}-{n} ({len(test)} pairs), error in metres",
        ["fit", "median", "p90", "max", "median <= 0.10 m"],
        rows,
    )
    return out


def rendered_scenes(count: int, seed: int = 7) -> list[tuple[np.ndarray, list[tuple[float, ...]]]]:
    """640 x 480 frames: textured background, 0-3 silhouettes 150-260 px tall, no overlaps."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(count):
        base = rng.uniform(120, 220, 3)
        img = np.clip(base + rng.normal(0, 10, (480, 640, 3)), 0, 255).astype(np.uint8)
        for _ in range(4):  # clutter: rectangles that are not people
            x, y = rng.integers(0, 600), rng.integers(0, 440)
            cv2.rectangle(
                img,
                (int(x), int(y)),
                (int(x + rng.integers(20, 120)), int(y + rng.integers(10, 60))),
                tuple(int(c) for c in rng.integers(0, 255, 3)),
                -1,
            )
        boxes = []
        for k in range(int(rng.integers(0, 4))):
            h = float(rng.uniform(150, 260))
            x = 90 + k * 200 + float(rng.uniform(-20, 20))
            boxes.append(
                draw_person(
                    img,
                    x,
                    float(rng.uniform(5, 470 - h)),
                    h,
                    tuple(int(c) for c in rng.integers(0, 200, 3)),
                )
            )
        scenes.append((img, boxes))
    return scenes


def _recall_fp(
    detector: Any, scenes: list[tuple[np.ndarray, list[tuple[float, ...]]]]
) -> dict[str, float | None]:
    from edgeway.tracker.vision.tracking import iou_matrix

    found = total = fps = boxes = 0
    start = time.perf_counter()
    per_frame = detector.detect([img for img, _ in scenes])
    elapsed = time.perf_counter() - start
    for (_, gt), dets in zip(scenes, per_frame, strict=True):
        total += len(gt)
        boxes += len(dets)
        if not dets:
            continue
        iou = iou_matrix(np.array(gt, float).reshape(-1, 4), np.array([d.bbox_xyxy for d in dets]))
        hit = iou.max(axis=1) >= 0.3 if len(gt) else np.zeros(0, bool)
        found += int(hit.sum())
        fps += int((iou.max(axis=0) < 0.3).sum()) if len(gt) else len(dets)
    return {
        "recall": found / max(total, 1),
        # Of the boxes it gave, the share on a drawn person (None: it gave none).
        "precision": (boxes - fps) / boxes if boxes else None,
        "fp_per_frame": fps / len(scenes),
        "ms_per_frame": 1000 * elapsed / len(scenes),
        "people": total,
    }


def detectors() -> dict[str, Any]:
    scenes = rendered_scenes(30)
    out: dict[str, Any] = {"HOG": _recall_fp(HogDetector(), scenes)}
    if SSDLITE.is_file():
        out["SSDLite (onnx)"] = _recall_fp(
            OnnxDetector(
                model_path=SSDLITE, input_size=(300, 300), confidence_threshold=0.5, device="cpu"
            ),
            scenes,
        )
    else:
        out["SSDLite (onnx)"] = f"not measured: {SSDLITE} missing (make eval converts it)"
    rows = [
        [
            k,
            f"{v['recall']:.2f}",
            "-" if v["precision"] is None else f"{v['precision']:.2f}",
            f"{v['fp_per_frame']:.2f}",
            f"{v['ms_per_frame']:.1f}",
        ]
        if isinstance(v, dict)
        else [k, v, "", "", ""]
        for k, v in out.items()
    ]
    table(
        f"4. Detectors on {len(scenes)} rendered 640x480 frames "
        f"({out['HOG']['people']} drawn people; "
        "a hit is IoU >= 0.3 with the drawn figure)",
        ["detector", "recall", "precision", "FP/frame", "ms/frame"],
        rows,
    )
    return out


#: Goals of issue 23 item 11 for global IDF1 (global IDF1 over every camera, one id space).
MTMC_GOALS = {"clean": 90.0, "noisy": 75.0}
#: The real pipeline is slow on 2 cores (HOG on three frames a step): one report seed, 10 s.
PIPELINE_FRAMES = 100
#: HOG's scale step for the pipeline run: 1.1, what `make run` and the service tests use. Its
#: boxes are scored twice: as the service reports them (the window) and tightened
#: (``tight_hog_box``): the window never reaches IoU 0.5 with the drawn figure.
PIPELINE_HOG_SCALE = 1.1


def _mtmc_row(label: str, seed: int, r: dict[str, Any]) -> list[Any]:
    g = r["global"]
    cams = " / ".join(f"{m['HOTA']:.1f}" for m in r["per_camera"].values())
    err = r["map_error_median_m"]
    return [
        label,
        seed,
        cams,
        f"{g['HOTA']:.1f}",
        f"{g['AssA']:.1f}",
        f"{g['IDF1']:.1f}",
        f"{r['global_idf1_without_reid']:.1f}",
        f"{r['global_idf1_true_ids']:.1f}",
        f"{r['people']}/{r['global_ids']}",
        f"{r['split_people']}/{r['merged_ids']}",
        "-" if err is None else f"{err:.2f}",
    ]


def multi_camera() -> dict[str, Any]:
    external = {
        variant: {seed: mtmc.run_external(seed, variant) for seed in mtmc.REPORT_SEEDS}
        for variant in ("clean", "noisy")
    }
    rows = [
        _mtmc_row(f"external, {variant}", seed, r)
        for variant, runs in external.items()
        for seed, r in runs.items()
    ]
    pipeline: dict[str, Any] = {}
    seed = mtmc.REPORT_SEEDS[0]
    rules = {"HOG window + MobileNetV2": lambda b: b, "HOG tight + MobileNetV2": tight_hog_box}
    try:
        from edgeway.tracker.vision.embedding import MobileNetV2Embedder

        embedder = MobileNetV2Embedder(device="cpu")
        hog = HogDetector(scale=PIPELINE_HOG_SCALE)
        start = time.perf_counter()
        pipeline["runs"] = mtmc.run_pipeline(seed, PIPELINE_FRAMES, hog, embedder, rules)
        pipeline["seconds"] = time.perf_counter() - start
        rows += [_mtmc_row(name, seed, r) for name, r in pipeline["runs"].items()]
    except Exception as exc:  # noqa: BLE001 - report why, keep the rest of the run
        pipeline["error"] = f"not measured: {exc}"
        rows.append(["HOG + MobileNetV2", seed, pipeline["error"], *[""] * 8])
    cams = "/".join(c for c, *_ in mtmc.CAMERAS)
    table(
        f"5. Multi-camera: {len(mtmc.CAMERAS)} cameras ({cams}; c1-c2 overlap, c3 apart), "
        f"{mtmc.PEOPLE} people, 2 alike-dressed pairs, {mtmc.FPS:g} fps, "
        f"{mtmc.NUM_FRAMES} frames ({PIPELINE_FRAMES} for the pipeline); report seeds "
        f"{mtmc.REPORT_SEEDS} (tuned on {mtmc.TUNING_SEEDS} only)",
        [
            "setting",
            "seed",
            f"HOTA {cams}",
            "global HOTA",
            "global AssA",
            "global IDF1",
            "IDF1 no Re-ID",
            "IDF1 true ids",
            "people/ids",
            "split/merged",
            "map err m",
        ],
        rows,
    )
    goals = []
    for variant, goal in MTMC_GOALS.items():
        scores = [r["global"]["IDF1"] for r in external[variant].values()]
        goals.append(
            [
                f"external, {variant}",
                f">= {goal:.0f}",
                " ".join(f"{v:.1f}" for v in scores),
                f"{np.mean(scores):.1f}",
                "yes" if min(scores) >= goal else "NO",
            ]
        )
    table(
        "   Global IDF1 goals (met: on every report seed). IDF1 no Re-ID: the same run scored "
        "with per-camera track ids; IDF1 true ids: its boxes with the right person's id, the "
        "most association could reach; split/merged: people with > 1 global id / ids on > 1 "
        f"person (pairs lasting >= {mtmc.MIN_LINK_FRAMES} frames)",
        ["setting", "goal", "per seed", "mean", "met"],
        goals,
    )
    return {
        "scene": {
            "cameras": mtmc.CAMERAS,
            "overlaps": mtmc.OVERLAPS,
            "people": mtmc.PEOPLE,
            "alike_pairs": mtmc.ALIKE_PAIRS,
            "fps": mtmc.FPS,
            "frames": mtmc.NUM_FRAMES,
            "embedding_noise": mtmc.EMBEDDING_NOISE,
        },
        "report_seeds": mtmc.REPORT_SEEDS,
        "tuning_seeds": mtmc.TUNING_SEEDS,
        "external": external,
        "pipeline": {"frames": PIPELINE_FRAMES, "hog_scale": PIPELINE_HOG_SCALE, **pipeline},
        "goals": goals,
    }


def end_to_end(steps: int = 8) -> dict[str, Any]:
    """Frames/s of the service's whole step (detect every camera's frame, embed, track, Re-ID)
    for the demo environment: three 640 x 480 cameras. Frames are rendered beforehand."""
    scene = demo_scene()
    env = demo_environment(scene)
    specs = [
        CameraSpec(
            c.camera_id,
            (c.width, c.height),
            homography=fit_homography(c.image_points, c.map_points),
        )
        for c in scene.cameras
    ]
    overlaps = [(a, b) for a, b in env["overlaps"]]
    frames = [{c.camera_id: scene.render(c, f)[0] for c in scene.cameras} for f in range(steps + 1)]
    from edgeway.tracker.vision.embedding import MobileNetV2Embedder

    embedder = MobileNetV2Embedder(device="cpu")
    detectors: dict[str, Any] = {
        "HOG 1.05": HogDetector(),
        f"HOG {PIPELINE_HOG_SCALE}": HogDetector(scale=PIPELINE_HOG_SCALE),
    }
    if SSDLITE.is_file():
        detectors["SSDLite (onnx)"] = OnnxDetector(
            model_path=SSDLITE, input_size=(300, 300), device="cpu"
        )
    out: dict[str, Any] = {"cameras": len(specs), "frame_size": "640x480", "steps": steps}
    for name, detector in detectors.items():
        mct = MultiCameraTracker(specs, overlaps, embedder=embedder)
        boxes = 0
        elapsed = 0.0
        for k, by_cam in enumerate(frames):
            start = time.perf_counter()
            found = detector.detect(list(by_cam.values()))
            mct.update(k, dict(zip(by_cam, found, strict=True)), by_cam)
            if k:  # the first step warms up
                elapsed += time.perf_counter() - start
                boxes += sum(len(d) for d in found)
        out[name] = {
            "steps_per_s": steps / elapsed,
            "camera_frames_per_s": steps * len(specs) / elapsed,
            "boxes_per_frame": boxes / (steps * len(specs)),
        }
    return out


def _time(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats


def speed() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    n_frames, n_boxes = 300, 30
    starts = rng.uniform([20, 20], [600, 360], (n_boxes, 2))
    vel = rng.normal(0, 2, (n_boxes, 2))
    frames = []
    for t in range(n_frames):
        c = starts + vel * t
        frames.append([Detection((x - 15, y - 40, x + 15, y + 40), 0.9) for x, y in c])
    out: dict[str, Any] = {}

    ours = CameraTracker()
    start = time.perf_counter()
    for dets in frames:
        ours.update(dets)
    out["tracker_ms_per_frame_30_boxes"] = 1000 * (time.perf_counter() - start) / n_frames
    base = IouBaselineTracker()
    start = time.perf_counter()
    for dets in frames:
        base.update([d.bbox_xyxy for d in dets], [d.confidence for d in dets])
    out["iou_baseline_ms_per_frame_30_boxes"] = 1000 * (time.perf_counter() - start) / n_frames

    frame = np.clip(rng.normal(150, 30, (480, 640, 3)), 0, 255).astype(np.uint8)
    hog = HogDetector()
    out["hog_ms_per_frame_640x480"] = _time(lambda: hog.detect([frame]), 3)
    if SSDLITE.is_file():
        ssd = OnnxDetector(model_path=SSDLITE, input_size=(300, 300), device="cpu")
        out["ssdlite_ms_per_frame_640x480"] = _time(lambda: ssd.detect([frame]), 5)
    try:
        from edgeway.tracker.vision.embedding import MobileNetV2Embedder

        crops = [frame[i * 10 : i * 10 + 160, i * 15 : i * 15 + 64] for i in range(30)]
        for hw in ((128, 64), (256, 128)):
            emb = MobileNetV2Embedder(input_hw=hw, device="cpu")
            out[f"mobilenetv2_ms_per_crop_{hw[0]}x{hw[1]}_batch30"] = (
                _time(lambda e=emb: e.embed(crops), 3) / 30
            )
    except Exception as exc:  # noqa: BLE001 - report why, keep the rest of the run
        out["mobilenetv2"] = f"not measured: {exc}"
    rows = [
        [k, f"{v:.2f}" if isinstance(v, float) else v, goal]
        for k, v, goal in (
            (k, v, {"tracker_ms_per_frame_30_boxes": "<= 2 ms"}.get(k, "")) for k, v in out.items()
        )
    ]
    table(
        "6. Speed (one process, this machine; compare rows, not absolutes)",
        ["what", "ms", "goal"],
        rows,
    )
    try:
        e2e = end_to_end()
    except Exception as exc:  # noqa: BLE001 - report why, keep the rest of the run
        out["end_to_end"] = f"not measured: {exc}"
        return out
    out["end_to_end"] = e2e
    table(
        f"   End to end, {e2e['cameras']} demo cameras at {e2e['frame_size']}: detect + "
        f"MobileNetV2 + track + Re-ID, {e2e['steps']} steps after a warm-up "
        "(SSDLite finds no one on the cartoon figures, so it embeds nothing)",
        ["detector", "steps/s", "camera frames/s", "boxes/frame"],
        [
            [
                k,
                f"{v['steps_per_s']:.2f}",
                f"{v['camera_frames_per_s']:.2f}",
                f"{v['boxes_per_frame']:.1f}",
            ]
            for k, v in e2e.items()
            if isinstance(v, dict)
        ],
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Tracker vision evaluation")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    with contextlib.redirect_stdout(io.StringIO()):
        import trackeval  # noqa: F401  (prints a note about its optional BURST dataset)
    torch_threads = None
    try:
        import torch

        torch_threads = torch.get_num_threads()
    except ImportError:
        pass
    machine = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch_threads": torch_threads,
        "opencv": cv2.__version__,
    }
    print(f"machine: {machine}")
    report = {
        "machine": machine,
        "known_answers": known_answers(),
        "tracker_only": tracker_only(),
        "map_projection": map_projection(),
        "detectors": detectors(),
        "multi_camera": multi_camera(),
        "speed": speed(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
