"""End-to-end runs of examples/run_*.py on tiny generated data: one process, torchrun and accelerate (CPU DDP).
Each run goes through `run_with_digest.py`, which prints every process's final parameter digest."""

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from synthetic_scenes import SYNTHETIC_CLASS_NAMES, write_synthetic_ade20k, write_synthetic_imagefolder
from transformers import AutoModelForImageClassification, AutoModelForSemanticSegmentation, pipeline

from locatvit_hf import LocAtViTForImageClassification, LocAtViTForSemanticSegmentation

from .conftest import parameter_digest, tiny_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SEGMENTATION = EXAMPLES / "run_semantic_segmentation.py"
CLASSIFICATION = EXAMPLES / "run_image_classification.py"
WITH_DIGEST = Path(__file__).resolve().parent / "run_with_digest.py"
TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,patch_size=8"
COMMON = ["--per_device_train_batch_size", "4", "--logging_steps", "2", "--disable_tqdm", "true", "--seed", "0"]
TRAIN_IMAGES = 32  # one epoch: 8 steps of 4 in one process, 4 steps of 2 x 4 over two processes
LAUNCHERS = {
    "single": [],
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
    ],
}


def run(script: Path, args: list[str], tmp_home: Path, launcher: str = "single") -> str:
    env = {k: v for k, v in os.environ.items() if k not in {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"}}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_home), TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, *LAUNCHERS[launcher], str(WITH_DIGEST), str(script), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-6000:]}"
    return output


def digests(output: str) -> dict[int, str]:
    found = re.findall(r"\[rank (\d+)/(\d+)\] final parameter digest ([0-9a-f]{64})", output)
    return {int(rank): digest for rank, _, digest in found}


def assert_backend_threads_ended(output: str, world_size: int) -> None:
    """Each process ended its gloo threads before exiting (`run_with_digest.py` counts them; None without /proc)."""
    found = dict(re.findall(r"\[rank (\d+)/\d+\] backend threads at exit (\d+|None)", output))
    assert set(found) == {str(rank) for rank in range(world_size)}, output[-3000:]
    running = {rank: count for rank, count in found.items() if count not in ("0", "None")}
    assert not running, f"gloo threads still running at exit (a rank can abort during shutdown): {running}"


def read_results(output_dir: Path) -> dict:
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results, "empty all_results.json"
    for key, value in results.items():
        assert isinstance(value, (int, float)) and math.isfinite(value), f"{key} = {value!r}"
    return results


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    ade = root / "ade"
    write_synthetic_ade20k(ade, "training", TRAIN_IMAGES, seed=0, image_size=48)
    write_synthetic_ade20k(ade, "validation", 5, seed=1, image_size=40, max_image_size=56)
    folder = root / "imagefolder"
    write_synthetic_imagefolder(folder, "train", TRAIN_IMAGES, seed=0, image_size=32)
    write_synthetic_imagefolder(folder, "validation", 10, seed=1, image_size=32)
    # A saved starting model: the frozen-backbone test compares against its tensors.
    torch.manual_seed(0)
    init = root / "init"
    LocAtViTForSemanticSegmentation(tiny_config(num_labels=9, image_size=32)).save_pretrained(init)
    return {"root": root, "ade": ade, "folder": folder, "init": init, "home": root / "hf_home", "runs": {}}


def segmentation_args(workspace, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(workspace["init"]), "--data_dir", str(workspace["ade"]), "--reduce_labels",
        "--num_labels", "9", "--crop_size", "32", "--train_scale", "64", "48", "--eval_scale", "48", "32",
        "--num_train_epochs", "1", "--max_steps", "-1", "--eval_strategy", "no", "--save_strategy", "no",
        "--output_dir", str(output_dir), *COMMON, *extra,
    ]  # fmt: skip


def classification_args(workspace, output_dir: Path, *extra: str) -> list[str]:
    folder = workspace["folder"]
    return [
        "--train_dir", str(folder / "train"), "--validation_dir", str(folder / "validation"),
        "--config_overrides", TINY, "--image_size", "32", "--learning_rate", "1e-3",
        "--per_device_eval_batch_size", "4", "--num_train_epochs", "1", "--eval_strategy", "no",
        "--save_strategy", "no", "--output_dir", str(output_dir), *COMMON, *extra,
    ]  # fmt: skip


def script_run(workspace, task: str, launcher: str) -> tuple[Path, str]:
    """(output dir, output) of one run of a script, made once per module for each task and launcher."""
    script, make_args = {
        "seg": (SEGMENTATION, segmentation_args),
        "cls": (CLASSIFICATION, classification_args),
    }[task]
    if (task, launcher) not in workspace["runs"]:
        output_dir = workspace["root"] / f"{task}-{launcher}"
        output = run(script, make_args(workspace, output_dir), workspace["home"], launcher)
        workspace["runs"][task, launcher] = (output_dir, output)
    return workspace["runs"][task, launcher]


def segmentation_run(workspace, launcher: str) -> tuple[Path, str]:
    return script_run(workspace, "seg", launcher)


def classification_run(workspace, launcher: str) -> tuple[Path, str]:
    return script_run(workspace, "cls", launcher)


def test_segmentation_single_process(workspace):
    output_dir, output = segmentation_run(workspace, "single")
    results = read_results(output_dir)
    assert results["train_global_step"] == TRAIN_IMAGES // 4 and results["train_world_size"] == 1
    assert 0.0 <= results["eval_mean_iou"] <= 1.0 and 0.0 <= results["eval_pixel_accuracy"] <= 1.0
    assert any(key.startswith("eval_iou_") for key in results)
    model = AutoModelForSemanticSegmentation.from_pretrained(output_dir)
    assert type(model).__name__ == "LocAtViTForSemanticSegmentation" and model.config.num_labels == 9
    assert digests(output) == {0: parameter_digest(model)}
    assert (output_dir / "predictions.png").is_file()
    # The Gaussian statistics are in the Trainer's log.
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "loss" in entry]
    assert logged and all(math.isfinite(entry["gauss_alpha/layer_1"]) for entry in logged)
    assert {"gauss_var_row/layer_0", "gauss_var_col/layer_0"} <= set(logged[0])


def test_segmentation_frozen_backbone_is_bit_identical(workspace):
    output_dir, _ = segmentation_run(workspace, "single")
    before = load_file(workspace["init"] / "model.safetensors")
    after = load_file(output_dir / "model.safetensors")
    backbone = [key for key in before if key.startswith("locatvit.")]
    assert len(backbone) > 20
    for key in backbone:
        assert torch.equal(before[key], after[key]), f"{key} changed with a frozen backbone"
    assert not torch.equal(before["decode_head.classifier.weight"], after["decode_head.classifier.weight"])


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_segmentation_data_parallel(workspace, launcher):
    single_dir, _ = segmentation_run(workspace, "single")
    output_dir, output = segmentation_run(workspace, launcher)
    results = read_results(output_dir)
    single = read_results(single_dir)
    assert results["train_world_size"] == 2
    assert results["train_global_step"] * 2 == single["train_global_step"]
    ranks = digests(output)
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1], "the replicas ended with different weights"
    assert ranks[0] == parameter_digest(AutoModelForSemanticSegmentation.from_pretrained(output_dir))
    assert_backend_threads_ended(output, world_size=2)


def test_classification_single_process_and_pipeline(workspace):
    output_dir, output = classification_run(workspace, "single")
    results = read_results(output_dir)
    assert results["train_global_step"] == TRAIN_IMAGES // 4
    assert 0.0 <= results["eval_top1_accuracy"] <= results["eval_top5_accuracy"] <= 1.0
    model = AutoModelForImageClassification.from_pretrained(output_dir)
    assert model.config.num_labels == 8 and digests(output) == {0: parameter_digest(model)}
    classifier = pipeline("image-classification", model=str(output_dir))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    predictions = classifier(image, top_k=3)
    assert len(predictions) == 3 and {p["label"] for p in predictions} <= set(model.config.id2label.values())


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_classification_data_parallel(workspace, launcher):
    single_dir, _ = classification_run(workspace, "single")
    output_dir, output = classification_run(workspace, launcher)
    results = read_results(output_dir)
    assert results["train_world_size"] == 2
    assert results["train_global_step"] * 2 == read_results(single_dir)["train_global_step"]
    ranks = digests(output)
    assert set(ranks) == {0, 1} and ranks[0] == ranks[1], "the replicas ended with different weights"
    assert ranks[0] == parameter_digest(AutoModelForImageClassification.from_pretrained(output_dir))
    assert_backend_threads_ended(output, world_size=2)


def test_segmentation_pipeline(workspace):
    output_dir, _ = segmentation_run(workspace, "single")
    segmenter = pipeline("image-segmentation", model=str(output_dir))
    # Not the configured size: the saved config resamples the position embeddings for whole images of any size.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8))
    segments = segmenter(image)
    assert segments and all(segment["mask"].size == image.size for segment in segments)
    assert {segment["label"] for segment in segments} <= set(str(v) for v in range(9))


def test_segmentation_resume_and_full_finetune(workspace):
    """A run stopped after its first checkpoint resumes from it: step count, optimizer and schedule carry on."""
    home = workspace["home"]
    extra = ["--full_finetune", "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3"]
    straight = workspace["root"] / "seg-resume-straight"
    run(SEGMENTATION, segmentation_args(workspace, straight, *extra, "--num_overlay_images", "0"), home)

    resumed = workspace["root"] / "seg-resume"
    args = segmentation_args(workspace, resumed, *extra, "--num_overlay_images", "0")
    run(SEGMENTATION, args, home)
    # Simulate a run killed after its first checkpoint: only checkpoint-3 is left.
    shutil.rmtree(resumed / "checkpoint-6")
    for leftover in ("model.safetensors", "all_results.json", "trainer_state.json"):
        (resumed / leftover).unlink()
    checkpoint = load_file(resumed / "checkpoint-3" / "model.safetensors")
    output = run(SEGMENTATION, args, home)
    assert "Resuming from the last checkpoint" in output and "checkpoint-3" in output
    assert read_results(resumed)["train_global_step"] == 6

    def learning_rates(directory):
        history = json.loads((directory / "trainer_state.json").read_text())["log_history"]
        return {entry["step"]: entry["learning_rate"] for entry in history if "learning_rate" in entry}

    # The one-cycle schedule continues where it stopped (a restarted one would be at its warm-up).
    assert learning_rates(resumed) == pytest.approx(learning_rates(straight), rel=1e-9)
    assert set(learning_rates(resumed)) == {2, 4, 6}
    after = load_file(resumed / "model.safetensors")
    before = load_file(workspace["init"] / "model.safetensors")
    key = "locatvit.encoder.layers.0.attention.q_proj.weight"
    assert not torch.equal(checkpoint[key], after[key])  # it trained after resuming
    assert not torch.equal(before[key], checkpoint[key])  # --full_finetune trains the backbone


def load_script(path: Path):
    """An example script imported as a module (its `main` is not run)."""
    spec = importlib.util.spec_from_file_location(f"locatvit_example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_model_overrides_only_when_no_model_is_named(tmp_path):
    """The demo's small-model overrides build the default model; a named checkpoint or preset keeps its own
    architecture, and --config_overrides given on the command line always apply."""
    script = load_script(SEGMENTATION)

    def parsed_model_args(*argv):
        argv = [*argv, "--output_dir", str(tmp_path)]
        return script.build_parser(argv).parse_args_into_dataclasses(args=argv)[0]

    demo = parsed_model_args()
    assert (demo.model_name_or_path, demo.config_overrides) == (script.DEMO_MODEL, script.DEMO_CONFIG_OVERRIDES)
    for named in ("some/checkpoint", "small"):
        model_args = parsed_model_args("--model_name_or_path", named)
        assert (model_args.model_name_or_path, model_args.config_overrides) == (named, None)
    explicit = parsed_model_args("--model_name_or_path", "x", "--config_overrides", "drop_path_rate=0.1")
    assert explicit.config_overrides == "drop_path_rate=0.1"


def test_segmentation_demo_from_a_classification_checkpoint(workspace, tmp_path):
    """The demo (no data argument) started from a saved classification model: the checkpoint's architecture is kept
    (the demo's defaults, an integer `patch_size` among them, describe a new model and are not applied), the head is
    new for the demo's classes, the frozen backbone is the checkpoint's, and the run writes its outputs."""
    checkpoint = tmp_path / "classifier"
    LocAtViTForImageClassification(tiny_config(num_labels=8)).save_pretrained(checkpoint)
    output_dir = tmp_path / "seg-from-classifier"
    args = [
        "--model_name_or_path", str(checkpoint), "--synthetic_train_samples", "8", "--synthetic_eval_samples", "2",
        "--crop_size", "32", "--train_scale", "64", "48", "--eval_scale", "48", "32", "--max_steps", "2",
        "--num_overlay_images", "2", "--output_dir", str(output_dir), *COMMON,
    ]  # fmt: skip
    output = run(SEGMENTATION, args, workspace["home"])
    results = read_results(output_dir)
    assert results["train_global_step"] == 2 and 0.0 <= results["eval_mean_iou"] <= 1.0
    model = AutoModelForSemanticSegmentation.from_pretrained(output_dir)
    assert type(model).__name__ == "LocAtViTForSemanticSegmentation"
    assert (model.config.hidden_size, tuple(model.config.patch_size)) == (32, (8, 8))
    assert list(model.config.id2label.values()) == list(SYNTHETIC_CLASS_NAMES)
    assert digests(output) == {0: parameter_digest(model)}
    assert (output_dir / "predictions.png").is_file()
    before = load_file(checkpoint / "model.safetensors")
    after = load_file(output_dir / "model.safetensors")
    backbone = [key for key in after if key.startswith("locatvit.")]  # the classifier's final norm is unused
    assert len(backbone) > 20 and all(torch.equal(before[key], after[key]) for key in backbone)
