"""The README's main job, shortened (few iterations), end to end; and the demo on its output."""
import json
import os

import pytest

from helpers import run_script


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart")
    output_dir = str(root / "output")
    result = run_script(
        ["tools/quickstart.py", "--num-pictures", "2", "OUTPUT_DIR", output_dir, "SOLVER.MAX_ITER", "10",
         "SOLVER.WARMUP_ITERS", "5", "SOLVER.STEPS", "()", "SOLVER.IMS_PER_BATCH", "4"],
        env={"DETECTRON2_DATASETS": str(root / "datasets")},
    )
    assert result.returncode == 0, result.stdout[-4000:]
    return output_dir, result.stdout


def test_quickstart_prints_table_and_writes_model_results_pictures(quickstart_run):
    output_dir, stdout = quickstart_run
    assert "random" in stdout and "No CLIP weights" in stdout
    assert "eta:" in stdout  # progress with an ETA
    assert "COCO evaluation on the generated val split" in stdout
    assert "  box " in stdout and "  mask " in stdout
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    assert set(results) == {"bbox", "segm"} and all("AP" in r for r in results.values())
    pictures = sorted(os.listdir(os.path.join(output_dir, "pictures")))
    assert pictures == ["00000_predictions.png", "00000_score_maps.png", "00001_predictions.png", "00001_score_maps.png"]
    assert os.path.isfile(os.path.join(output_dir, "model_final.pth"))


def test_demo_on_a_folder_with_score_maps(quickstart_run, tmp_path):
    output_dir, _ = quickstart_run
    images = os.path.join(os.path.dirname(output_dir), "datasets", "shapes", "val")
    out = str(tmp_path / "demo")
    result = run_script([
        "demo/demo.py", "--config-file", "configs/Shapes-InstanceSegmentation/mask_rcnn_denseclip_tiny_FPN.yaml",
        "--input", os.path.join(images, "0000[0-2].png"), "--output", out, "--score-maps",
        "--opts", "MODEL.WEIGHTS", os.path.join(output_dir, "model_final.pth"),
    ])
    assert result.returncode == 0, result.stdout[-4000:]
    written = sorted(os.listdir(out))
    assert written == [f"0000{i}{suffix}.png" for i in range(3) for suffix in ("", "_score_maps")]


def test_demo_on_a_video(quickstart_run, tmp_path):
    import cv2

    output_dir, _ = quickstart_run
    frames = sorted(os.listdir(os.path.join(os.path.dirname(output_dir), "datasets", "shapes", "val")))[:3]
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5, (128, 128))
    for name in frames:
        writer.write(cv2.imread(os.path.join(os.path.dirname(output_dir), "datasets", "shapes", "val", name)))
    writer.release()
    out = str(tmp_path / "out.mp4")
    result = run_script([
        "demo/demo.py", "--config-file", "configs/Shapes-InstanceSegmentation/mask_rcnn_denseclip_tiny_FPN.yaml",
        "--video-input", video, "--output", out,
        "--opts", "MODEL.WEIGHTS", os.path.join(output_dir, "model_final.pth"),
    ])
    assert result.returncode == 0, result.stdout[-4000:]
    written = cv2.VideoCapture(out)
    assert int(written.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    ok, frame = written.read()
    assert ok and frame.shape[:2] == (512, 512)  # drawn enlarged, like the pictures
