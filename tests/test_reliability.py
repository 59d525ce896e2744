"""Resume after SIGKILL, atomic checkpoints, distributed training on CPU, and unusual input."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from detectron2.utils.env import seed_all_rng

from denseclip.engine import DenseCLIPTrainer

from helpers import REPO, TINY_SHAPES_CONFIGS, dataset_opts, load_cfg, run_script, tiny_opts, write_coco_dataset

pytestmark = pytest.mark.slow

CONFIG = TINY_SHAPES_CONFIGS["mask_rcnn"]


@pytest.fixture(scope="module")
def coco_dataset(tmp_path_factory):
    return write_coco_dataset(str(tmp_path_factory.mktemp("reliability_data")), num_images=8)


def train_opts(coco_dataset, output_dir, iterations, period):
    return [
        *dataset_opts(*coco_dataset), *tiny_opts("mask_rcnn", output_dir, iterations),
        "SOLVER.CHECKPOINT_PERIOD", str(period), "DATASETS.TEST", "()",
    ]


def last_checkpoint(output_dir):
    try:
        with open(os.path.join(output_dir, "last_checkpoint")) as f:
            return os.path.join(output_dir, f.read().strip())
    except FileNotFoundError:
        return None


def test_resume_after_sigkill_restores_everything(coco_dataset, tmp_path):
    output_dir = str(tmp_path / "run")
    opts = train_opts(coco_dataset, output_dir, iterations=400, period=5)
    process = subprocess.Popen(
        [sys.executable, "train_net.py", "--config-file", CONFIG, *opts],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (last_checkpoint(output_dir) or "").endswith("model_0000009.pth"):
            assert process.poll() is None, "training exited before writing its second checkpoint"
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    saved_path = last_checkpoint(output_dir)
    saved = torch.load(saved_path, map_location="cpu", weights_only=False)
    assert saved["iteration"] >= 9

    cfg = load_cfg(CONFIG, opts)
    trainer = DenseCLIPTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == saved["iteration"] + 1
    model_state = trainer.model.state_dict()
    assert model_state.keys() == saved["model"].keys()
    for key, value in saved["model"].items():
        assert torch.equal(model_state[key], value), key
    contexts = "backbone.score_map.text_encoder.contexts"
    assert torch.equal(model_state[contexts], saved["model"][contexts])
    assert trainer.scheduler.state_dict() == saved["trainer"]["hooks"]["LRScheduler"]
    optimizer_state, saved_optimizer = trainer.optimizer.state_dict(), saved["trainer"]["_trainer"]["optimizer"]
    assert optimizer_state["param_groups"] == saved_optimizer["param_groups"]
    assert len(saved_optimizer["state"]) > 0
    for index, state in saved_optimizer["state"].items():
        for name, value in state.items():
            assert torch.equal(optimizer_state["state"][index][name], value)

    opts = train_opts(coco_dataset, output_dir, iterations=saved["iteration"] + 4, period=5)
    result = run_script(["train_net.py", "--config-file", CONFIG, "--resume", *opts])
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"Starting training from iteration {saved['iteration'] + 1}" in result.stdout
    assert os.path.isfile(os.path.join(output_dir, "model_final.pth"))


KILL_WHILE_SAVING = """
import os, signal, sys, torch

from denseclip import get_denseclip_cfg, register_coco_format_datasets
from denseclip.engine import DenseCLIPTrainer

real_save, calls = torch.save, []
def dying_save(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the second checkpoint: write half of it, then die
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = dying_save
cfg = get_denseclip_cfg(sys.argv[1], sys.argv[2:])
register_coco_format_datasets(cfg)
trainer = DenseCLIPTrainer(cfg)
trainer.resume_or_load(resume=False)
trainer.train()
"""


def test_kill_while_saving_never_leaves_a_broken_checkpoint_for_resume(coco_dataset, tmp_path):
    output_dir = str(tmp_path / "run")
    opts = train_opts(coco_dataset, output_dir, iterations=20, period=5)
    result = run_script(["-c", KILL_WHILE_SAVING, CONFIG, *opts])
    assert result.returncode == -signal.SIGKILL
    assert last_checkpoint(output_dir) == os.path.join(output_dir, "model_0000004.pth")
    assert not os.path.exists(os.path.join(output_dir, "model_0000009.pth"))  # only a temporary file was cut
    torch.load(last_checkpoint(output_dir), map_location="cpu", weights_only=False)

    result = run_script(["train_net.py", "--config-file", CONFIG, "--resume", *opts])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Starting training from iteration 5" in result.stdout


def test_two_processes_equal_one_process_with_both_images(coco_dataset, tmp_path):
    """One SGD step of a tiny DenseCLIP R-CNN: 2 gloo processes x 1 image == 1 process x 2 images,
    with the COCO configs' synchronised BatchNorm (on CPU: Detectron2's NaiveSyncBatchNorm, whose
    statistics over the 2 processes are those of the 2-image batch). Settings make every loss
    normalisation batch-size invariant: all anchors and proposals are sampled, both images have 2
    objects, no masks (their loss averages over a per-image-varying number of foreground boxes), and
    no randomness (flip, dropout) that would draw differently in each process."""
    common = [
        *dataset_opts(*coco_dataset), *tiny_opts("mask_rcnn", "", 1), "DATASETS.TEST", "()",
        "MODEL.MASK_ON", "False", "MODEL.CLIP.NORM", "SyncBN", "INPUT.RANDOM_FLIP", "none",
        "MODEL.DENSECLIP.CONTEXT_DECODER.DROPOUT", "0.0",
        "SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", "0.0", "SOLVER.BASE_LR", "0.01",
        "SOLVER.WARMUP_ITERS", "0", "SOLVER.CLIP_GRADIENTS.ENABLED", "False", "SOLVER.IMS_PER_BATCH", "2",
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "100000", "MODEL.RPN.POSITIVE_FRACTION", "1.0",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "20", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "100000",
        "MODEL.ROI_HEADS.POSITIVE_FRACTION", "1.0", "DATALOADER.ASPECT_RATIO_GROUPING", "False",
    ]
    finals = {}
    for gpus in (1, 2):
        output_dir = str(tmp_path / f"procs{gpus}")
        with socket.socket() as free:  # a free port: the default one is shared by every run of this user
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        result = run_script([
            "train_net.py", "--config-file", CONFIG, "--num-gpus", str(gpus), "--dist-url", f"tcp://127.0.0.1:{port}",
            *common, "OUTPUT_DIR", output_dir,
        ])
        assert result.returncode == 0, result.stdout[-3000:]
        finals[gpus] = torch.load(os.path.join(output_dir, "model_final.pth"), map_location="cpu", weights_only=False)["model"]
    seed_all_rng(0)  # what train_net.py's default_setup does with SEED 0 on rank 0: the same init
    initial = DenseCLIPTrainer.build_model(load_cfg(CONFIG, common)).state_dict()
    moved = set()
    for key, value in finals[1].items():
        if key.endswith("num_batches_tracked"):  # NaiveSyncBatchNorm does not count its steps
            continue
        if key.endswith("running_var"):
            # One process updates running_var with the unbiased batch variance (torch's BatchNorm), two
            # with the biased one (NaiveSyncBatchNorm): n / (n - 1) apart, n = the values per channel.
            torch.testing.assert_close(finals[2][key], value, rtol=0.1, atol=1e-6, msg=key)
            continue
        # The step itself (lr x gradient for SGD) must agree, to 0.1% of the tensor's largest change
        # (plus 1e-7: lr x the rounding noise of gradients that are zero in exact arithmetic, such as the
        # attention pool's key bias): a loss or gradient normalised differently in one setting moves it
        # by another amount.
        one, two = value - initial[key], finals[2][key] - initial[key]
        scale = one.abs().max().item()
        assert (two - one).abs().max().item() <= 1e-3 * scale + 1e-7, (key, scale, (two - one).abs().max().item())
        if scale > 1e-6:
            moved.add(key)
    contexts, bn = "backbone.score_map.text_encoder.contexts", "backbone.bottom_up.layer1.0.bn1."
    assert {contexts, "backbone.score_map.gamma", bn + "weight", bn + "running_mean"} <= moved
    assert len(moved) > 10
