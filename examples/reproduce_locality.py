#!/usr/bin/env python
"""The paper's experiment in miniature: classification pre-training, then a frozen-backbone segmentation probe.

Four variants that differ only in the two switches of `LocAtViTConfig` are trained with the same data, the same seeds
and the same number of steps:

    vit        use_gaussian_attention=False, use_patch_refinement=False   (the plain ViT baseline)
    gaug       use_gaussian_attention=True,  use_patch_refinement=False
    prr        use_gaussian_attention=False, use_patch_refinement=True
    locatvit   use_gaussian_attention=True,  use_patch_refinement=True    (LocAtViT)

By default ViT against LocAtViT over 8 seeds (`--variants`, `--seeds`). For every (variant, seed):

1. pre-training for image classification from scratch with `examples/run_image_classification.py` (the Trainer
   script, one-cycle schedule), from an `initial_checkpoint` that gives every variant of a seed
   the same network (GAug's maps aside) and thus makes the comparison per seed paired;
2. a linear probe with `examples/run_semantic_segmentation.py --model_name_or_path <probe_start>`: the backbone
   frozen and in eval mode, the paper's linear head (docs/method.md#features-and-head) on the last block's patch
   tokens, mIoU on held-out scenes (`SegmentationTrainer`, `SegmentationMetrics`). `probe_start` is the pre-trained
   backbone with a new, seeded head, saved as a segmentation checkpoint (see `probe_start` for why the script is not
   pointed at the classification checkpoint directly).

Plus, per seed, a reference probe of the plain ViT at its random initialization (`--no_random_init_baseline` skips
it): how much of the mIoU the frozen features owe to pre-training at all.

Both scripts run as subprocesses (`--workers` of them at a time, `--threads` each) or, with `--workers 0`, in this
process through their `main(argv)`. There is no training loop here: this file writes the data, builds the two
command lines per run, and collects `all_results.json`.

Data (`<output_dir>/data`, written once, deterministically): scenes of `synthetic_scenes.render_synthetic_scene`,
numpy only. A smooth grey-ish gradient background (class 0) with two to four occluding objects (ellipses, rotated
rectangles, triangles), each of one of eight classes = four textures (stripes, checks, dots, waves; random orientation
and phase, periods of 6 to 9 px) x two palettes (warm, cool); pixel noise and brightness jitter on top. Each scene has
an exact per-pixel mask (the painted regions) and an image-level label: the object class with the most visible
pixels. Training scenes are `(data_seed, i)`, held-out scenes `(data_seed + 1, i)`. Every image is written once, as
`ade/images/{training,validation}/scene_*.png` with its mask (pixel value = class, 0..8) in `ade/annotations/...`,
and hard-linked into `classification/{train,validation}/<class>/` for the classification script's `imagefolder`
loader: pre-training and probing see the very same images.

Why it tests locality: the image label is a *global* property (which of several objects covers the most area: the
classifier has to compare regions across the whole image), while the probe asks every patch token for its *own*
content (texture x palette of the object under it, or background), read by a per-patch linear head that cannot look
at the neighbours. Colour alone or texture alone does not name a class. A backbone whose patch tokens drift towards
global image content during classification training, as the paper argues for a plain ViT, probes worse.

    python examples/reproduce_locality.py                      # the default run (about 45 min on 2 CPU cores)
    python examples/reproduce_locality.py --seeds 0 --variants vit locatvit --pretrain_steps 100 --probe_steps 50

Outputs in `--output_dir` (default `runs/reproduce_locality`):
`runs/<variant>/seed<k>/{init,pretrain,probe_start,probe}/` (the scripts' output folders, with the models and
`all_results.json`; a finished run is reused when the script is started again with the same settings, an unfinished
one resumes from its last checkpoint), `results.json`, `results.md` (the table), `results.png` (bar chart) and,
unless `--no_figures`, `figures/*.png` made with `locatvit_hf.visualization` from the first LocAtViT run. The table
gives, per variant, the paired difference to the plain ViT with its 95 % interval over seeds, and the Gaussians'
statistics before and after pre-training; it states the versions of torch, transformers and accelerate and the
project's commit, and a run is reused only under the same ones (`provenance`).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parent
SCRIPTS = {
    "pretrain": EXAMPLES / "run_image_classification.py",
    "probe": EXAMPLES / "run_semantic_segmentation.py",
}

# The four variants: only the two switches differ.
VARIANTS = {
    "vit": {"use_gaussian_attention": False, "use_patch_refinement": False, "name": "ViT"},
    "gaug": {"use_gaussian_attention": True, "use_patch_refinement": False, "name": "ViT + GAug"},
    "prr": {"use_gaussian_attention": False, "use_patch_refinement": True, "name": "ViT + PRR"},
    "locatvit": {"use_gaussian_attention": True, "use_patch_refinement": True, "name": "LocAtViT (GAug + PRR)"},
}

# Reference row: the plain ViT's probe at its random initialization (no pre-training), the floor for the features.
RANDOM_INIT = "vit_random_init"
RANDOM_INIT_NAME = "ViT, random init (no pre-training)"

# ImageNet statistics on 0-1, the same as the segmentation script's on 0-255: both phases normalize alike.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add = parser.add_argument
    add("--output_dir", default="runs/reproduce_locality", help="Where the data, runs and results go.")
    add("--variants", nargs="+", default=["vit", "locatvit"], choices=list(VARIANTS), help="Variants to train.")
    add("--seeds", nargs="+", type=int, default=list(range(8)), help="Training seeds (initialization, order, crops).")
    # data
    add("--train_images", type=int, default=4096, help="Training scenes (used by both phases).")
    add("--eval_images", type=int, default=1024, help="Held-out scenes (top-1 and mIoU are measured on them).")
    add("--data_seed", type=int, default=0, help="Seed of the scenes: training (seed, i), held-out (seed + 1, i).")
    add("--image_size", type=int, default=64, help="Scene and model input size (square).")
    # model
    add("--patch_size", type=int, default=8)
    add("--hidden_size", type=int, default=96)
    add("--num_layers", type=int, default=6)
    add("--num_heads", type=int, default=3)
    add("--mlp_ratio", type=int, default=4)
    add("--decoder_hidden_size", type=int, default=512, help="Width of the linear probe's head (the paper's: 512).")
    # pre-training (classification)
    add("--pretrain_steps", type=int, default=1000)
    add("--pretrain_lr", type=float, default=1e-3)
    add("--pretrain_batch_size", type=int, default=32)
    add("--pretrain_warmup", type=float, default=0.1, help="Warm-up, as a fraction of the steps.")
    add("--weight_decay", type=float, default=0.05)
    add("--label_smoothing", type=float, default=0.1)
    # probe (segmentation, frozen backbone)
    add("--probe_steps", type=int, default=250)
    add("--probe_lr", type=float, default=1e-3)
    add("--probe_batch_size", type=int, default=32)
    # scheduling
    add("--workers", type=int, default=2, help="Runs at a time, as subprocesses; 0: one at a time, in-process.")
    add("--threads", type=int, default=1, help="torch threads per run.")
    add("--force", action="store_true", help="Retrain finished runs instead of reusing them.")
    add("--no_figures", action="store_true", help="Skip the locatvit_hf.visualization figures.")
    add(
        "--no_random_init_baseline",
        action="store_true",
        help="Skip the reference probe of the plain ViT at its random initialization (one per seed).",
    )
    return parser


def model_overrides(args: argparse.Namespace, variant: str) -> str:
    """`--config_overrides` of the pre-training: the architecture, identical for all variants but the switches."""
    switches = VARIANTS[variant]
    fields = {
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "intermediate_size": args.mlp_ratio * args.hidden_size,
        "patch_size": args.patch_size,
        "image_size": args.image_size,
        "decoder_hidden_size": args.decoder_hidden_size,
        "use_gaussian_attention": switches["use_gaussian_attention"],
        "use_patch_refinement": switches["use_patch_refinement"],
    }
    return ",".join(f"{key}={value}" for key, value in fields.items())


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def class_names() -> list[str]:
    from synthetic_scenes import SYNTHETIC_CLASS_NAMES

    return list(SYNTHETIC_CLASS_NAMES)


def data_manifest(args: argparse.Namespace) -> dict:
    return {
        "generator": "synthetic_scenes.render_synthetic_scene",
        "train": {"seed": args.data_seed, "images": args.train_images},
        "validation": {"seed": args.data_seed + 1, "images": args.eval_images},
        "image_size": args.image_size,
        "class_names": class_names(),
    }


def prepare_data(args: argparse.Namespace, root: Path) -> dict[str, Path]:
    """Write the scenes once: ADE20K layout (image + mask) for the probe, hard links in an imagefolder layout (one
    folder per image label) for the pre-training, the class names, and the `datasets` cache of the imagefolder."""
    from PIL import Image
    from synthetic_scenes import render_synthetic_scene

    paths = {
        "root": root,
        "ade": root / "ade",
        "classification": root / "classification",
        "class_names": root / "class_names.json",
        "cache": root / "hf_cache",
    }
    manifest = data_manifest(args)
    manifest_path = root / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("scenes") == manifest:
        return paths
    if root.exists():
        shutil.rmtree(root)
    names = manifest["class_names"]
    label_counts = {}
    for split, cls_split, spec in (
        ("training", "train", manifest["train"]),
        ("validation", "validation", manifest["validation"]),
    ):
        image_dir, mask_dir = paths["ade"] / "images" / split, paths["ade"] / "annotations" / split
        image_dir.mkdir(parents=True)
        mask_dir.mkdir(parents=True)
        counts = np.zeros(len(names), dtype=np.int64)
        for index in range(spec["images"]):
            scene = render_synthetic_scene(spec["seed"], index, args.image_size, args.image_size)
            name = f"scene_{index:05d}.png"
            Image.fromarray(scene.image).save(image_dir / name)
            Image.fromarray(scene.mask).save(mask_dir / name)
            folder = paths["classification"] / cls_split / names[scene.label].replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            try:
                os.link(image_dir / name, folder / name)
            except OSError:
                shutil.copyfile(image_dir / name, folder / name)
            counts[scene.label] += 1
        label_counts[cls_split] = {names[k]: int(c) for k, c in enumerate(counts) if k}
    paths["class_names"].write_text(json.dumps(names))
    # Build the `datasets` cache of the imagefolder here, once, with the very call of the classification script.
    import datasets

    datasets.load_dataset(
        "imagefolder",
        data_files={
            "train": os.path.join(paths["classification"] / "train", "**"),
            "validation": os.path.join(paths["classification"] / "validation", "**"),
        },
        cache_dir=str(paths["cache"]),
    )
    manifest_path.write_text(json.dumps({"scenes": manifest, "image_labels": label_counts}, indent=2))
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------------


@functools.cache
def provenance() -> dict:
    """What the numbers depend on besides the settings: the versions of torch, transformers and accelerate and the
    project's commit (`dirty` when src/ or examples/ differ from it). A finished run is reused only under the same
    provenance, and one table never mixes two (`common_provenance`)."""
    import accelerate
    import torch
    import transformers

    import locatvit_hf

    repository = Path(locatvit_hf.__file__).resolve().parents[2]

    def git(*command: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repository), *command], capture_output=True, text=True)
        except OSError:
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "commit": commit or "unknown",
        "dirty": bool(git("status", "--porcelain", "--", "src", "examples")) if commit else None,
    }


def common_provenance(results: list[dict]) -> dict:
    """The one provenance of `results`; a ValueError when they come from different versions or commits."""
    found = {json.dumps(r["provenance"], sort_keys=True) for r in results}
    if len(found) != 1:
        raise ValueError(
            f"The runs come from {len(found)} different sets of versions ({'; '.join(sorted(found))}); results "
            "of different versions are not comparable. Start the script again with --force to retrain every run."
        )
    return results[0]["provenance"]


def provenance_line(stamp: dict) -> str:
    commit = stamp["commit"][:12] + (" with local changes" if stamp["dirty"] else "")
    return (
        f"torch {stamp['torch']}, transformers {stamp['transformers']}, accelerate {stamp['accelerate']}, "
        f"Python {stamp['python']}, locatvit-hf commit {commit}"
    )


def pretrain_args(args: argparse.Namespace, seed: int, data: dict, initial: Path, output_dir: Path) -> list[str]:
    """Command line of `run_image_classification.py`: from the `initial_checkpoint`, no augmentation that could change
    the label."""
    checkpoints = max(args.pretrain_steps // 4, 1)
    return [
        "--model_name_or_path", str(initial),
        "--train_dir", str(data["classification"] / "train"),
        "--validation_dir", str(data["classification"] / "validation"),
        "--cache_dir", str(data["cache"]),
        "--image_size", str(args.image_size), "--crop_pct", "1.0",
        "--image_mean", *map(str, IMAGENET_MEAN), "--image_std", *map(str, IMAGENET_STD),
        # Crops, erasing, Mixup/CutMix could hide or shrink the largest object, and colour changes swap palettes:
        # only flips keep the label intact.
        "--random_resized_crop", "false", "--rand_augment", "false", "--color_jitter", "0",
        "--random_erasing", "0", "--mixup_alpha", "0", "--cutmix_alpha", "0",
        "--label_smoothing", str(args.label_smoothing),
        "--max_steps", str(args.pretrain_steps), "--learning_rate", str(args.pretrain_lr),
        "--warmup_steps", str(args.pretrain_warmup), "--weight_decay", str(args.weight_decay),
        "--per_device_train_batch_size", str(args.pretrain_batch_size), "--per_device_eval_batch_size", "128",
        "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", str(checkpoints),
        "--save_total_limit", "1", "--logging_steps", str(max(args.pretrain_steps // 20, 1)),
        "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--seed", str(seed),
        "--output_dir", str(output_dir),
    ]  # fmt: skip


def probe_args(args: argparse.Namespace, seed: int, data: dict, pretrained: Path, output_dir: Path) -> list[str]:
    """Command line of `run_semantic_segmentation.py`: the paper's protocol (docs/method.md#linear-probe-segmentation:
    frozen backbone, linear head, one-cycle with 25 % warm-up, AdamW 1e-3, random rescale x[0.5, 2] + crop, flip,
    photometric distortion), scaled down."""
    num_labels = len(class_names())
    return [
        "--model_name_or_path", str(pretrained),
        "--data_dir", str(data["ade"]), "--num_labels", str(num_labels),
        "--label_names_file", str(data["class_names"]),
        "--crop_size", str(args.image_size),
        "--train_scale", str(4 * args.image_size), str(args.image_size),
        "--eval_scale", str(4 * args.image_size), str(args.image_size),
        "--max_steps", str(args.probe_steps), "--learning_rate", str(args.probe_lr), "--warmup_steps", "0.25",
        "--per_device_train_batch_size", str(args.probe_batch_size), "--per_device_eval_batch_size", "128",
        "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", str(max(args.probe_steps // 2, 1)),
        "--save_total_limit", "1", "--logging_steps", str(max(args.probe_steps // 10, 1)),
        "--num_overlay_images", "0", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
        "--seed", str(seed), "--output_dir", str(output_dir),
    ]  # fmt: skip


_MODULES: dict[str, object] = {}


def example_module(phase: str):
    """The example script of `phase`, imported as a module (for `--workers 0`)."""
    if phase not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"locatvit_example_{phase}", SCRIPTS[phase])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[phase] = module
    return _MODULES[phase]


def run_script(phase: str, argv: list[str], log_path: Path, threads: int, in_process: bool) -> None:
    """Run one example script to completion; its output goes to `log_path`."""
    if in_process:  # the script's output goes to this process's stdout/stderr
        import torch

        log_path.write_text(f"in-process: {SCRIPTS[phase].name} {' '.join(argv)}\n")
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            example_module(phase).main(argv)
        finally:
            torch.set_num_threads(previous)
        return
    env = {k: v for k, v in os.environ.items() if k not in {"WORLD_SIZE", "RANK", "LOCAL_RANK"}}
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    command = [sys.executable, str(SCRIPTS[phase]), *argv]
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{SCRIPTS[phase].name} failed (exit {result.returncode}), see {log_path}:\n{tail}")


def run_phase(phase: str, argv: list[str], output_dir: Path, identity: dict, args: argparse.Namespace) -> dict:
    """One script run, reused when it finished with the same `identity` (command line, data, and for a probe the
    pre-training it starts from); resumed by the script from its last checkpoint when it was interrupted; started
    afresh when anything changed, the `provenance` included. Returns its `all_results.json` plus the wall time and the
    provenance of the run."""
    stamp = output_dir / "reproduce_run.json"
    results_path = output_dir / "all_results.json"
    record = {"identity": identity, "argv": argv, "provenance": provenance()}
    previous = json.loads(stamp.read_text()) if stamp.is_file() else None
    same = previous is not None and {k: previous.get(k) for k in record} == record and not args.force
    if same and results_path.is_file():
        return {
            **json.loads(results_path.read_text()),
            "wall_seconds": previous.get("wall_seconds", 0.0),
            "provenance": previous["provenance"],
        }
    if output_dir.exists() and not same:
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(record, indent=2))
    start = time.perf_counter()
    run_script(phase, argv, output_dir / "log.txt", args.threads, in_process=args.workers == 0)
    record["wall_seconds"] = round(time.perf_counter() - start, 1)
    stamp.write_text(json.dumps(record, indent=2))
    for checkpoint in output_dir.glob("checkpoint-*"):  # only needed to resume an unfinished run
        shutil.rmtree(checkpoint)
    return {
        **json.loads(results_path.read_text()),
        "wall_seconds": record["wall_seconds"],
        "provenance": record["provenance"],
    }


# The runs' threads share the parent's global torch generator: model construction holds this lock.
_TORCH_RNG = threading.Lock()


def file_digest(checkpoint: Path) -> str:
    """SHA-256 of a checkpoint's `model.safetensors`."""
    import hashlib

    return hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()


def probe_start(pretrained: Path, names: list[str], seed: int, directory: Path) -> Path:
    """The probe's starting checkpoint: a `LocAtViTForSemanticSegmentation` with the pre-trained backbone (every
    tensor of the classification checkpoint's `locatvit.*`, loaded strictly) and a new linear head for the
    segmentation classes, initialized as `LocAtViTPreTrainedModel._init_weights` describes (truncated normal 0.02 for
    both 1x1 convs, zero bias, GroupNorm 1/0) from a generator seeded with `seed`.

    Built here rather than by `run_semantic_segmentation.py --model_name_or_path <classification checkpoint>` so that
    the head's initial weights depend on `seed` alone, not on the global generator's state."""
    import torch

    from locatvit_hf import LocAtViTConfig, LocAtViTForImageClassification, LocAtViTForSemanticSegmentation

    config = LocAtViTConfig.from_pretrained(pretrained)
    config.id2label = dict(enumerate(names))
    config.label2id = {name: index for index, name in enumerate(names)}
    config.architectures = None
    with _TORCH_RNG:  # constructing draws from the global generator (all of it is overwritten below)
        model = LocAtViTForSemanticSegmentation(config)
    classifier = LocAtViTForImageClassification.from_pretrained(pretrained)
    backbone = classifier.locatvit.state_dict()  # its final norm, which only the classifier reads, stays behind
    model.locatvit.load_state_dict({key: backbone[key] for key in model.locatvit.state_dict()}, strict=True)
    generator = torch.Generator().manual_seed(seed)
    head = model.decode_head
    with torch.no_grad():
        for conv in (head.projection, head.classifier):
            torch.nn.init.trunc_normal_(conv.weight, std=config.initializer_range, generator=generator)
        torch.nn.init.zeros_(head.classifier.bias)
        torch.nn.init.ones_(head.norm.weight)
        torch.nn.init.zeros_(head.norm.bias)
    if directory.exists():
        shutil.rmtree(directory)
    model.save_pretrained(directory)
    return directory


def initial_checkpoint(args: argparse.Namespace, variant: str, seed: int, directory: Path) -> Path:
    """Where the pre-training of (variant, seed) starts: a `LocAtViTForImageClassification` for the image classes.

    Every parameter the variant shares with the plain ViT is the plain ViT's of the same seed (drawn first, under
    `torch.manual_seed(seed)`); the variant's own parameters, GAug's variance and strength maps, are drawn after them.
    So the variants of one seed start from the same network, see the same batches, and differ only by the switches:
    the comparison per seed is paired. The random-init reference probes exactly the plain ViT's start."""
    import torch

    from locatvit_hf import LocAtViTConfig, LocAtViTForImageClassification
    from locatvit_hf.training import parse_config_overrides

    image_classes = sorted(name.replace(" ", "_") for name in class_names()[1:])  # imagefolder's label order
    labels = {"id2label": dict(enumerate(image_classes)), "label2id": {n: i for i, n in enumerate(image_classes)}}

    def config(name: str) -> LocAtViTConfig:
        return LocAtViTConfig(**parse_config_overrides(model_overrides(args, name)), **labels)

    with _TORCH_RNG:  # the runs' threads share the global generator
        torch.manual_seed(seed)
        plain = LocAtViTForImageClassification(config("vit"))
        model = LocAtViTForImageClassification(config(variant))
    shared, own = plain.state_dict(), model.state_dict()
    if not set(shared) <= set(own):
        raise RuntimeError(f"{variant} lacks parameters of the plain ViT: {sorted(set(shared) - set(own))}")
    model.load_state_dict({key: shared.get(key, value) for key, value in own.items()}, strict=True)
    if directory.exists():
        shutil.rmtree(directory)
    model.save_pretrained(directory)
    return directory


def held_out_pixels(data: dict, count: int):
    """The first `count` held-out scenes as normalized pixel values (count, 3, H, W), and the pictures themselves."""
    import torch
    from PIL import Image

    files = sorted((data["ade"] / "images" / "validation").glob("*.png"))[:count]
    images = [np.array(Image.open(path).convert("RGB")) for path in files]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixel_values = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255 - mean) / std
    return pixel_values, images, files


def gaussian_summary(checkpoint: Path, data: dict, count: int = 64) -> list[dict]:
    """Per layer, over every patch query and head of `count` held-out scenes: the mean variance along rows and along
    columns (patches²), the mean strength alpha, and the spread of the variances across queries (standard deviation
    of their natural log), which shows whether the Gaussians became query-dependent."""
    import torch

    from locatvit_hf import LocAtViTForImageClassification
    from locatvit_hf.visualization import gaussian_statistics

    model = LocAtViTForImageClassification.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        statistics = gaussian_statistics(model, held_out_pixels(data, count)[0])
    return [
        {
            "layer": layer,
            "variance_row": float(values["variance_row"].mean()),
            "variance_col": float(values["variance_col"].mean()),
            "strength": float(values["strength"].mean()),
            "log_variance_std": float(np.log(np.stack((values["variance_row"], values["variance_col"]))).std()),
        }
        for layer, values in statistics.items()
    ]


def run_one(args: argparse.Namespace, variant: str, seed: int, data: dict, runs_dir: Path) -> dict:
    """Pre-train, then probe, one (variant, seed); with GAug, the Gaussians' statistics before and after
    pre-training."""
    base = runs_dir / variant / f"seed{seed}"
    initial = initial_checkpoint(args, variant, seed, base / "init")
    pretrained = base / "pretrain"
    pre_argv = pretrain_args(args, seed, data, initial, pretrained)
    pre_identity = {"data": data_manifest(args), "init_digest": file_digest(initial)}
    pre = run_phase("pretrain", pre_argv, pretrained, pre_identity, args)
    start = probe_start(pretrained, json.loads(data["class_names"].read_text()), seed, base / "probe_start")
    probe_dir = base / "probe"
    probe_identity = {"data": data_manifest(args), "pretrain": pre_argv, "start_digest": file_digest(start)}
    probe = run_phase("probe", probe_args(args, seed, data, start, probe_dir), probe_dir, probe_identity, args)
    result = {
        "variant": variant,
        "seed": seed,
        "top1": pre["eval_top1_accuracy"],
        "top5": pre["eval_top5_accuracy"],
        "pretrain_loss": pre.get("train_loss"),
        "pretrain_steps": pre.get("train_global_step"),
        "pretrain_seconds": pre["wall_seconds"],
        **probe_result(probe),
    }
    if pre["provenance"] != result["provenance"]:
        raise RuntimeError(f"{variant} seed {seed}: the probe ran under other versions than its pre-training.")
    if VARIANTS[variant]["use_gaussian_attention"]:
        result["gaussians"] = {"start": gaussian_summary(initial, data), "end": gaussian_summary(pretrained, data)}
    print(
        f"[{variant} seed {seed}] top-1 {100 * result['top1']:.1f} %  mIoU {100 * result['mean_iou']:.1f} %  "
        f"({result['pretrain_seconds']:.0f} s + {result['probe_seconds']:.0f} s)",
        flush=True,
    )
    return result


def probe_result(probe: dict) -> dict:
    """The result fields of a probe run, from its `all_results.json` (plus its wall time)."""
    return {
        "mean_iou": probe["eval_mean_iou"],
        "pixel_accuracy": probe["eval_pixel_accuracy"],
        "mean_accuracy": probe["eval_mean_accuracy"],
        "probe_loss": probe.get("train_loss"),
        "probe_steps": probe.get("train_global_step"),
        "class_iou": {k[len("eval_iou_") :]: v for k, v in probe.items() if k.startswith("eval_iou_")},
        "probe_seconds": probe["wall_seconds"],
        "provenance": probe["provenance"],
    }


def run_random_init(args: argparse.Namespace, seed: int, data: dict, runs_dir: Path) -> dict:
    """The reference probe: the plain ViT at its random initialization (the very weights its pre-training of `seed`
    starts from), frozen and probed exactly as the pre-trained backbones."""
    base = runs_dir / RANDOM_INIT / f"seed{seed}"
    initial = initial_checkpoint(args, "vit", seed, base / "init")
    start = probe_start(initial, class_names(), seed, base / "probe_start")
    probe_dir = base / "probe"
    identity = {"data": data_manifest(args), "random_init": file_digest(initial), "start_digest": file_digest(start)}
    probe = run_phase("probe", probe_args(args, seed, data, start, probe_dir), probe_dir, identity, args)
    result = {
        "variant": RANDOM_INIT,
        "seed": seed,
        **probe_result(probe),
    }
    print(f"[{RANDOM_INIT} seed {seed}] mIoU {100 * result['mean_iou']:.1f} %", flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------------------


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    values = np.asarray(list(values), dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(results: list[dict]) -> dict:
    """Per variant: mean and std over seeds of every metric, and the mIoU / top-1 differences to the plain ViT paired
    by seed (when the plain ViT ran). The random-init reference, if it ran, comes first."""
    summary = {}
    runs_of = {v: [r for r in results if r["variant"] == v] for v in (RANDOM_INIT, *VARIANTS)}
    baseline = {r["seed"]: r for r in runs_of["vit"]}
    for variant, runs in runs_of.items():
        if not runs:
            continue
        if variant == RANDOM_INIT:
            entry = {"name": RANDOM_INIT_NAME, "seeds": [r["seed"] for r in runs]}
            entry.update(use_gaussian_attention=False, use_patch_refinement=False, pretrained=False)
        else:
            entry = {"name": VARIANTS[variant]["name"], "seeds": [r["seed"] for r in runs], "pretrained": True}
            entry.update({k: bool(VARIANTS[variant][k]) for k in ("use_gaussian_attention", "use_patch_refinement")})
        for metric in ("top1", "top5", "mean_iou", "pixel_accuracy", "mean_accuracy"):
            if all(metric in r for r in runs):
                entry[metric] = dict(zip(("mean", "std"), mean_std(r[metric] for r in runs)))
        paired = [r for r in runs if r["seed"] in baseline]
        if variant != "vit" and paired:
            for metric in ("top1", "mean_iou"):
                if metric in entry:
                    deltas = [r[metric] - baseline[r["seed"]][metric] for r in paired]
                    entry[f"delta_{metric}"] = paired_difference(deltas, [r["seed"] for r in paired])
        if any("gaussians" in r for r in runs):
            entry["gaussians"] = {
                phase: mean_gaussians([r["gaussians"][phase] for r in runs if "gaussians" in r])
                for phase in ("start", "end")
            }
        summary[variant] = entry
    return summary


def paired_difference(deltas: list[float], seeds: list[int]) -> dict:
    """Differences to the plain ViT of the same seed: per seed, their mean and sample std, the 95 % confidence
    interval of the mean (Student's t with n - 1 degrees of freedom; none for one seed), and how many seeds favour
    each side."""
    from scipy import stats

    values = np.asarray(deltas, dtype=np.float64)
    mean, std = mean_std(values)
    entry = {"per_seed": dict(zip(map(str, seeds), values.tolist())), "mean": mean, "std": std}
    entry.update(better=int((values > 0).sum()), worse=int((values < 0).sum()))
    if len(values) > 1:
        half_width = float(stats.t.ppf(0.975, len(values) - 1)) * std / np.sqrt(len(values))
        entry["ci95"] = [mean - half_width, mean + half_width]
    return entry


def mean_gaussians(per_seed: list[list[dict]]) -> list[dict]:
    """`gaussian_summary` of several seeds, averaged over the seeds layer by layer."""
    return [
        {"layer": layers[0]["layer"], **{k: float(np.mean([x[k] for x in layers])) for k in layers[0] if k != "layer"}}
        for layers in zip(*per_seed)
    ]


def percent(stat: dict, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{100 * stat['mean']:{sign}.1f} ± {100 * stat['std']:.1f}"


def interval(stat: dict) -> str:
    """A paired difference in points: mean, 95 % interval, and seeds better / worse."""
    text = f"{100 * stat['mean']:+.1f}"
    if "ci95" in stat:
        low, high = stat["ci95"]
        text += f" [{100 * low:+.1f}, {100 * high:+.1f}]"
    return f"{text} ({stat['better']}/{stat['worse']})"


def markdown_table(summary: dict, results: list[dict]) -> str:
    lines = [
        "| variant | GAug | PRR | top-1 acc. (%) | probe mIoU (%) | probe pixel acc. (%) | Δ mIoU vs ViT (pts) "
        "| Δ top-1 vs ViT (pts) |",
        "|---|:-:|:-:|---:|---:|---:|---:|---:|",
    ]
    for entry in summary.values():
        cells = [
            entry["name"],
            "✓" if entry["use_gaussian_attention"] else "–",
            "✓" if entry["use_patch_refinement"] else "–",
            *(percent(entry[k]) if k in entry else "–" for k in ("top1", "mean_iou", "pixel_accuracy")),
            *(interval(entry[k]) if k in entry else "–" for k in ("delta_mean_iou", "delta_top1")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Mean ± sample std over seeds. Δ: the difference to the plain ViT of the same seed (same initial weights and "
        "batches), mean over seeds [95 % confidence interval, paired t] (seeds where the variant is higher / lower).",
    ]
    seeds = sorted({r["seed"] for r in results})
    lines += [
        "",
        "Per seed (top-1 / mIoU, %):",
        "",
        "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---:|" * len(seeds),
    ]
    for variant, entry in summary.items():
        cells = []
        for seed in seeds:
            run = next((r for r in results if r["variant"] == variant and r["seed"] == seed), None)
            top1 = f"{100 * run['top1']:.1f}" if run and "top1" in run else "–"
            cells.append(f"{top1} / {100 * run['mean_iou']:.1f}" if run else "–")
        lines.append(f"| {entry['name']} | " + " | ".join(cells) + " |")
    for entry in summary.values():
        if "delta_mean_iou" in entry:
            per_seed = entry["delta_mean_iou"]["per_seed"]
            cells = [f"{100 * per_seed[str(s)]:+.1f}" if str(s) in per_seed else "–" for s in seeds]
            lines.append(f"| Δ mIoU, {entry['name']} − ViT (pts) | " + " | ".join(cells) + " |")
    for entry in summary.values():
        if "gaussians" in entry:
            lines += ["", *gaussian_table(entry)]
    return "\n".join(lines) + "\n"


def gaussian_table(entry: dict) -> list[str]:
    """The Gaussians of one variant before → after pre-training, per layer, mean over seeds."""
    lines = [
        f"Gaussians of {entry['name']}, start → end of pre-training (held-out scenes, mean over seeds): variance "
        "along rows and columns (patches²), strength α, spread of ln(variance) across queries and heads (std):",
        "",
        "| layer | variance, rows | variance, columns | strength α | std of ln(variance) |",
        "|---:|---:|---:|---:|---:|",
    ]
    start, end = entry["gaussians"]["start"], entry["gaussians"]["end"]
    for before, after in zip(start, end):
        cells = [f"{before[k]:.2f} → {after[k]:.2f}" for k in ("variance_row", "variance_col", "strength")]
        cells.append(f"{before['log_variance_std']:.3f} → {after['log_variance_std']:.3f}")
        lines.append(f"| {before['layer']} | " + " | ".join(cells) + " |")
    return lines


BAR_COLOURS = {RANDOM_INIT: "#d9d9d9", "vit": "#8c8c8c", "gaug": "#5b9bd5", "prr": "#ed9f4a", "locatvit": "#2e8b57"}
BAR_LABELS = {RANDOM_INIT: "ViT,\nrandom init", "vit": "ViT", "gaug": "ViT + GAug", "prr": "ViT + PRR"}
BAR_LABELS["locatvit"] = "LocAtViT"


def bar_chart(summary: dict, results: list[dict], path: Path, title: str):
    """Two panels (top-1 accuracy of the pre-trained variants; probe mIoU, with the random-init reference if it ran):
    mean over seeds with a ±1 std error bar and its value, one dot per seed."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.6, 3.6), layout="constrained")
    axes = figure.subplots(1, 2, width_ratios=(4, 5))
    for ax, metric, ylabel in zip(axes, ("top1", "mean_iou"), ("top-1 accuracy (%)", "probe mIoU (%)")):
        variants = [v for v in summary if metric in summary[v]]
        means = [100 * summary[v][metric]["mean"] for v in variants]
        stds = [100 * summary[v][metric]["std"] for v in variants]
        positions = np.arange(len(variants))
        ax.bar(positions, means, yerr=stds, capsize=4, color=[BAR_COLOURS[v] for v in variants], edgecolor="black")
        values = {v: [100 * r[metric] for r in results if r["variant"] == v and metric in r] for v in variants}
        for position, variant in zip(positions, variants):
            offsets = np.linspace(-0.15, 0.15, len(values[variant])) if len(values[variant]) > 1 else [0.0]
            ax.scatter(position + np.asarray(offsets), values[variant], color="black", s=10, zorder=3)
        for position, mean, std in zip(positions, means, stds):
            ax.annotate(f"{mean:.1f}", (position, mean + std), textcoords="offset points", xytext=(0, 3), ha="center")
        high = max(max(v) for v in values.values())
        ax.set_ylim(0.0, min(100.0, 1.15 * high) or 1.0)  # bars from 0: differences are shown at their true scale
        ax.set_xticks(positions, [BAR_LABELS[v] for v in variants], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("classification pre-training", fontsize=10)
    axes[1].set_title("segmentation probe, frozen backbone", fontsize=10)
    figure.suptitle(title, fontsize=9)
    figure.savefig(path, dpi=100)
    return figure


def make_figures(args: argparse.Namespace, data: dict, runs_dir: Path, figures_dir: Path) -> list[Path]:
    """One PNG per `locatvit_hf.visualization` function, from the first LocAtViT run (or the last variant's)."""
    from PIL import Image

    from locatvit_hf import LocAtViTForImageClassification, LocAtViTForSemanticSegmentation
    from locatvit_hf import visualization as vis

    variant = "locatvit" if "locatvit" in args.variants else args.variants[-1]
    base = runs_dir / variant / f"seed{args.seeds[0]}"
    figures_dir.mkdir(parents=True, exist_ok=True)
    names = json.loads(data["class_names"].read_text())
    pixel_values, images, validation = held_out_pixels(data, 6)
    masks = [np.array(Image.open(data["ade"] / "annotations" / "validation" / p.name)) for p in validation]
    written = []
    classifier = LocAtViTForImageClassification.from_pretrained(base / "pretrain").eval()
    if classifier.config.use_gaussian_attention:
        path = figures_dir / "gaussian_statistics.png"
        vis.plot_gaussian_statistics(classifier, pixel_values, save_path=path)
        written.append(path)
        grid = classifier.config.grid_size
        path = figures_dir / "attention_map.png"
        vis.plot_attention_map(
            classifier,
            pixel_values[:1],
            query=(grid[0] // 2, grid[1] // 2),
            layer=classifier.config.num_hidden_layers - 1,
            head=0,
            image=images[0],
            save_path=path,
        )
        written.append(path)
    segmenter = LocAtViTForSemanticSegmentation.from_pretrained(base / "probe").eval()
    predictions = vis.predict_segmentation(segmenter, pixel_values)
    path = figures_dir / "segmentation.png"
    vis.plot_segmentation(images[:4], predictions[:4], dict(enumerate(names)), labels=masks[:4], save_path=path)
    written.append(path)
    return written


def machine_description(threads: int, workers: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, no accelerator; {max(workers, 1)} run(s) at a time with {threads} "
        f"torch thread(s) each; torch {torch.__version__}, Python {platform.python_version()}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"Writing the scenes into {output_dir / 'data'} ...", flush=True)
    data = prepare_data(args, output_dir / "data")
    runs_dir = output_dir / "runs"
    jobs = [(run_one, (args, variant, seed, data, runs_dir)) for seed in args.seeds for variant in args.variants]
    if not args.no_random_init_baseline:
        jobs += [(run_random_init, (args, seed, data, runs_dir)) for seed in args.seeds]
    if args.workers == 0:
        results = [function(*arguments) for function, arguments in jobs]
    else:
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            futures = [pool.submit(function, *arguments) for function, arguments in jobs]
            results = [future.result() for future in futures]
    wall = time.perf_counter() - start

    stamp = common_provenance(results)
    summary = summarize(results)
    table = markdown_table(summary, results)
    title = (
        f"Synthetic scenes, {args.image_size} px, patch {args.patch_size}, hidden {args.hidden_size}, "
        f"{args.num_layers} layers;\n{args.pretrain_steps} pre-training + {args.probe_steps} probe steps; "
        f"mean ± std over {len(args.seeds)} seed(s)"
    )
    report = {
        "command": "python examples/reproduce_locality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": vars(args),
        "machine": machine_description(args.threads, args.workers),
        "provenance": stamp,
        "wall_seconds": round(wall, 1),
        "summary": summary,
        "runs": results,
    }
    header = f"{title.replace(chr(10), ' ')}\n\n{provenance_line(stamp)}; {report['machine']}"
    (output_dir / "results.md").write_text(f"{header}\n\n{table}")
    chart = output_dir / "results.png"
    try:
        bar_chart(summary, results, chart, title)
        report["chart"] = str(chart)
    except ImportError:
        print("matplotlib is not installed (pip install 'locatvit-hf[examples]'): no bar chart.", flush=True)
    if not args.no_figures:
        try:
            report["figures"] = [str(p) for p in make_figures(args, data, runs_dir, output_dir / "figures")]
        except ImportError:
            print("matplotlib is not installed: no figures.", flush=True)
    (output_dir / "results.json").write_text(json.dumps(report, indent=2))
    print(f"\n{title}\n\n{table}\nWall time {wall / 60:.1f} min ({wall:.0f} s). Results in {output_dir}.", flush=True)
    return report


if __name__ == "__main__":
    main()
