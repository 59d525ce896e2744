"""demo/demo.py on a video, and what it prints, with the quick-start config's untrained model (no weights)."""
import glob
import os

import cv2
import numpy as np
import pytest

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from denseclip import get_denseclip_cfg
from denseclip.engine import DenseCLIPPredictor

from helpers import REPO, TINY_SHAPES_CONFIGS, load_script

CONFIG = os.path.join(REPO, TINY_SHAPES_CONFIGS["mask_rcnn"])


@pytest.fixture(scope="module")
def demo():
    return load_script("demo/demo.py")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A 2-frame 64 x 64 video."""
    path = str(tmp_path_factory.mktemp("video") / "clip.mp4")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 5, (64, 64))
    for value in (40, 200):
        writer.write(np.full((64, 64, 3), value, np.uint8))
    writer.release()
    assert int(cv2.VideoCapture(path).get(cv2.CAP_PROP_FRAME_COUNT)) == 2
    return path


def run_demo(demo, *args):
    demo.main(["--config-file", CONFIG, *args, "--opts", "MODEL.WEIGHTS", ""])


def frame_count(path):
    return int(cv2.VideoCapture(path).get(cv2.CAP_PROP_FRAME_COUNT))


def test_video_output_without_extension_in_a_new_folder(demo, video, tmp_path):
    """`--output out/video_out`: the folder is created and the video written with a video extension."""
    run_demo(demo, "--video-input", video, "--output", str(tmp_path / "new" / "video_out"))
    written = glob.glob(str(tmp_path / "new" / "video_out*"))
    assert [os.path.splitext(p)[1] for p in written] in ([".mkv"], [".mp4"])
    assert frame_count(written[0]) == 2


def test_video_output_folder_gets_the_input_name(demo, video, tmp_path):
    run_demo(demo, "--video-input", video, "--output", str(tmp_path / "folder") + os.sep)
    written = os.listdir(tmp_path / "folder")
    assert written in (["clip.mkv"], ["clip.mp4"])
    assert frame_count(str(tmp_path / "folder" / written[0])) == 2


def test_video_output_that_cannot_be_written_is_an_error(demo, video, tmp_path):
    with pytest.raises(ValueError, match=r"cannot write.*\.(mkv|mp4)"):
        run_demo(demo, "--video-input", video, "--output", str(tmp_path / "video.unknown"))


def test_unreadable_video_is_an_error(demo, tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="broken.mp4"):
        run_demo(demo, "--video-input", str(path), "--output", str(tmp_path / "out.mp4"))
    assert not os.path.exists(tmp_path / "out.mp4")


def test_demo_prints_how_many_instances_it_draws(demo, tmp_path, capsys):
    """The count printed is that of the instances drawn (score above the threshold), beside the total."""
    model = build_model(get_denseclip_cfg(CONFIG))
    DetectionCheckpointer(model, str(tmp_path)).save("random")
    weights, image_path = str(tmp_path / "random.pth"), str(tmp_path / "image.png")
    image = np.full((128, 128, 3), 30, np.uint8)
    image[30:90, 40:100] = (40, 200, 220)
    cv2.imwrite(image_path, image)
    predictor = DenseCLIPPredictor(get_denseclip_cfg(CONFIG, ["MODEL.WEIGHTS", weights]))
    scores = predictor(image)["instances"].scores.sort(descending=True).values
    assert len(scores) >= 3
    threshold = float(scores[1] + scores[2]) / 2  # between the second and third best: two drawn
    demo.main(["--config-file", CONFIG, "--input", image_path, "--output", str(tmp_path / "out.png"),
               "--confidence-threshold", str(threshold), "--opts", "MODEL.WEIGHTS", weights])
    assert f"{image_path}: 2 of {len(scores)} instances drawn (score >= {threshold})" in capsys.readouterr().out
