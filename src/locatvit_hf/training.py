"""What the example scripts (`examples/run_*.py`) share that `transformers`, `accelerate` and torch do not provide.

- `enable_cpu_data_parallel`: make `torchrun` / `accelerate launch --multi_gpu` train data-parallel on a machine
  without an accelerator, where `TrainingArguments` would otherwise give every process its own full run.
- `GaussianStatsCallback` / `install_gaussian_stats`: per-layer mean Gaussian variance (row, column) and strength
  alpha of GAug in the Trainer's log.
- `SegmentationMetrics`, `confusion_matrix`: mIoU, pixel accuracy and per-class IoU from a confusion matrix
  accumulated batch by batch (memory: num_labels**2 integers, whatever the number of images).
- `SegmentationTrainer`: whole-image evaluation at the original label size, streamed through the confusion matrix,
  data-parallel safe.
- `one_cycle_optimizers`: the paper's one-cycle schedule (torch's `OneCycleLR`) for `Trainer(optimizers=...)`.
- `TopKAccuracy`, `ClassificationLoss`: streaming top-1/top-5 and the soft-target / label-smoothing loss.
- `parse_run_arguments`, `checkpoint_to_resume`, `train_and_evaluate`, `publish`, `load_locatvit`: the scripts' run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from transformers import Trainer, TrainerCallback

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Data parallelism on CPU-only machines
# ---------------------------------------------------------------------------------------------------------------------


def accelerator_available() -> bool:
    """Whether this process sees an accelerator (CUDA, XPU, MPS, ...) that the Trainer would use."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def launched_world_size() -> int:
    """Number of processes of the launch this process belongs to (`WORLD_SIZE` set by torchrun / accelerate)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def enable_cpu_data_parallel(parser=None) -> bool:
    """Turn on CPU data parallelism for a multi-process launch on a machine without an accelerator.

    `torchrun --nproc_per_node N` and `accelerate launch --multi_gpu --num_processes N` start N processes, but on a
    CPU-only machine `TrainingArguments` sets them up with `world_size == 1` unless `use_cpu` is on: each process then
    silently trains its own full copy on all the data. Call this *before* building `TrainingArguments` (it is read when
    they are created): with `WORLD_SIZE > 1` and no accelerator it sets `ACCELERATE_USE_CPU=true` and, given the
    `HfArgumentParser`, makes `--use_cpu` the default, so that accelerate sets up DDP over gloo (one shard of every
    batch per process, gradients all-reduced). Returns whether it did.
    """
    if launched_world_size() <= 1 or accelerator_available():
        return False
    os.environ["ACCELERATE_USE_CPU"] = "true"
    if parser is not None:
        parser.set_defaults(use_cpu=True)
    return True


def pin_memory_only_with_accelerator(parser) -> bool:
    """Make `--dataloader_pin_memory` default to whether this process sees an accelerator, and return that default.

    Pinned (page-locked) host memory only speeds up copies to an accelerator. `TrainingArguments` pins by default, and
    without an accelerator every DataLoader then warns that `pin_memory` is set but unused. Given on the command line,
    `--dataloader_pin_memory` still wins.
    """
    pin = accelerator_available()
    parser.set_defaults(dataloader_pin_memory=pin)
    return pin


# ---------------------------------------------------------------------------------------------------------------------
# Gaussian statistics callback
# ---------------------------------------------------------------------------------------------------------------------


class GaussianStatsCallback(TrainerCallback):
    """Logs, per layer, the mean Gaussian variance along rows and columns and the mean strength alpha of GAug.

    Forward hooks on every `LocAtViTGaussianBias` recompute `variance_and_strength` from the patch queries of each
    *training* forward pass (one with gradients enabled; evaluation runs without) and average them over all queries,
    heads and images since the last log. The means are added to the training log entries (the ones with `loss`) as
    `gauss_var_row/layer_{i}`, `gauss_var_col/layer_{i}` and `gauss_alpha/layer_{i}`, so they reach the progress
    output, `trainer.state.log_history` and, if the callback runs before them (see `install_gaussian_stats`), the
    reporting integrations. Statistics are those of the local process (rank 0 is the one that logs).
    """

    def __init__(self):
        self._hooks = []
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}

    @staticmethod
    def gaussian_modules(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
        """(layer index, module) of every Gaussian bias module of `model`, in layer order."""
        from .modeling_locatvit import LocAtViTGaussianBias

        found = []
        for name, module in model.named_modules():
            if isinstance(module, LocAtViTGaussianBias):
                match = re.search(r"layers\.(\d+)\.", name)
                found.append((int(match.group(1)) if match else len(found), module))
        return sorted(found, key=lambda item: item[0])

    def attach(self, model: torch.nn.Module) -> None:
        """Hooks each layer's Gaussian module, which every attention backend calls with the queries and the grid."""
        self.detach()
        for index, gaussian in self.gaussian_modules(model):
            self._hooks.append(gaussian.register_forward_hook(self._make_hook(index)))

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _make_hook(self, index: int):
        def hook(gaussian, args, output):
            if not torch.is_grad_enabled():
                return
            query, grid_size = args
            with torch.no_grad():
                variance, strength = gaussian.variance_and_strength(query.detach()[:, :, 1:], grid_size)
                stats = torch.cat((variance.reshape(-1, 2).sum(0), strength.reshape(-1).sum(0, keepdim=True)))
            self._sums[index] = self._sums[index] + stats if index in self._sums else stats
            self._counts[index] = self._counts.get(index, 0) + strength.numel()

        return hook

    def current_means(self) -> dict[str, float]:
        """The means accumulated since the last log, as log entries (empty if no training forward ran)."""
        means = {}
        for index in sorted(self._sums):
            row, col, alpha = (self._sums[index] / self._counts[index]).tolist()
            means[f"gauss_var_row/layer_{index}"] = row
            means[f"gauss_var_col/layer_{index}"] = col
            means[f"gauss_alpha/layer_{index}"] = alpha
        return means

    def reset(self) -> None:
        self._sums, self._counts = {}, {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.attach(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self._sums:
            return
        means = self.current_means()
        self.reset()
        logs.update(means)
        # The Trainer appended a copy of `logs` to the history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(means)

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()


def install_gaussian_stats(trainer: Trainer) -> GaussianStatsCallback:
    """Add a `GaussianStatsCallback` to `trainer` *before* its other callbacks, so that the reporting integrations
    (TensorBoard, W&B, ...) and the progress output see the statistics in the same log entry."""
    callback = GaussianStatsCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


# ---------------------------------------------------------------------------------------------------------------------
# The run, shared by the example scripts
# ---------------------------------------------------------------------------------------------------------------------


def parse_run_arguments(parser, argv: list[str], script_logger: logging.Logger) -> tuple:
    """The scripts' command line (flags, or a single JSON file of them) parsed into the parser's dataclasses, and
    logging set up as in transformers' examples: the process's log level for the script, this package, datasets
    and transformers, and one line per process saying where it runs."""
    import datasets
    import transformers

    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    training_args = parsed[-1]
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    script_logger.setLevel(log_level)
    logging.getLogger("locatvit_hf").setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    script_logger.warning(
        f"Process rank: {training_args.process_index}, world size: {training_args.world_size}, device: "
        f"{training_args.device}, distributed: {training_args.parallel_mode.value}, use_cpu: {training_args.use_cpu}"
    )
    return parsed


def checkpoint_to_resume(training_args) -> str | bool | None:
    """`--resume_from_checkpoint` as the scripts read it: a path, 'latest'/'true' for the last checkpoint in
    `output_dir`, or, when not given, the last checkpoint already there (a stopped run picks up where it was)."""
    from transformers.trainer_utils import get_last_checkpoint

    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in {"latest", "true"}:
        return get_last_checkpoint(training_args.output_dir)
    if resume is None and training_args.do_train and os.path.isdir(training_args.output_dir or ""):
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is not None:
            logger.info(f"Resuming from the last checkpoint in the output directory: {resume}")
    return resume


def train_and_evaluate(trainer: Trainer, train_dataset, eval_dataset, resume) -> dict:
    """Train (then save the model, its metrics and the Trainer state) and evaluate. Returns the train and eval
    metrics."""
    args = trainer.args
    results = {}
    if train_dataset is not None:
        train_result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()
        metrics = dict(train_result.metrics)
        metrics["train_samples"] = len(train_dataset)
        metrics["train_global_step"] = trainer.state.global_step
        metrics["train_world_size"] = args.world_size
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    return results


def publish(trainer: Trainer, finetuned_from: str, task: str, dataset_name: str | None) -> None:
    """The Trainer's model card (and, with `--push_to_hub`, the upload) for a finished run."""
    card = {"finetuned_from": finetuned_from, "tasks": task}
    if dataset_name is not None:
        card["dataset"] = dataset_name
    if trainer.args.push_to_hub:
        trainer.push_to_hub(**card)
    elif trainer.is_world_process_zero():
        trainer.create_model_card(**card)


# ---------------------------------------------------------------------------------------------------------------------
# Streaming segmentation metrics
# ---------------------------------------------------------------------------------------------------------------------


def confusion_matrix(
    predictions: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, num_labels: int, ignore_index: int = 255
) -> torch.Tensor:
    """(num_labels, num_labels) int64 counts: row = ground-truth class, column = predicted class. Pixels labelled
    `ignore_index` are skipped; any other label outside [0, num_labels) is an error."""
    predictions = torch.as_tensor(predictions)
    labels = torch.as_tensor(labels, device=predictions.device)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape.")
    labels = labels.reshape(-1).long()
    predictions = predictions.reshape(-1).long()
    valid = labels != ignore_index
    labels, predictions = labels[valid], predictions[valid]
    if labels.numel():
        if int(labels.min()) < 0 or int(labels.max()) >= num_labels:
            raise ValueError(f"label values must be in [0, {num_labels}) or {ignore_index}.")
        if int(predictions.min()) < 0 or int(predictions.max()) >= num_labels:
            raise ValueError(f"predicted classes must be in [0, {num_labels}).")
    counts = torch.bincount(labels * num_labels + predictions, minlength=num_labels * num_labels)
    return counts.reshape(num_labels, num_labels)


def metrics_from_confusion(
    confusion: torch.Tensor | np.ndarray, id2label: dict[int, str] | None = None
) -> dict[str, float]:
    """mIoU, mean class accuracy, pixel accuracy and per-class IoU from a confusion matrix.

    A class that appears neither in the labels nor in the predictions has no IoU (0/0): it is left out of the mean
    and of the per-class entries, as in mmsegmentation and `evaluate`'s `mean_iou` (they use NaN and `nanmean`). A
    class predicted but absent from the labels counts with IoU 0.
    """
    confusion = torch.as_tensor(confusion, dtype=torch.float64).cpu()
    true_positive = confusion.diagonal()
    label_count = confusion.sum(1)
    union = label_count + confusion.sum(0) - true_positive
    present = union > 0
    iou = true_positive / union.clamp(min=1)
    labelled = label_count > 0
    accuracy = true_positive / label_count.clamp(min=1)
    total = float(label_count.sum())
    metrics = {
        "mean_iou": float(iou[present].mean()) if present.any() else 0.0,
        "mean_accuracy": float(accuracy[labelled].mean()) if labelled.any() else 0.0,
        "pixel_accuracy": float(true_positive.sum()) / total if total else 0.0,
    }
    for index in torch.nonzero(present).flatten().tolist():
        name = id2label.get(index, str(index)) if id2label else str(index)
        metrics[f"iou_{re.sub(r'[^0-9A-Za-z_-]+', '_', str(name)).strip('_') or index}"] = float(iou[index])
    return metrics


class SegmentationMetrics:
    """A confusion matrix accumulated batch by batch; its memory is num_labels**2 counts whatever the dataset size.

    Use `update(predictions, labels)` with class maps, or pass it as the Trainer's `compute_metrics` together with
    `SegmentationTrainer` and `batch_eval_metrics=True`: the Trainer then hands it each batch's confusion matrices
    (gathered from all processes) and asks for the result at the end of the evaluation.
    """

    def __init__(self, num_labels: int, ignore_index: int = 255, id2label: dict[int, str] | None = None):
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.id2label = {int(k): v for k, v in id2label.items()} if id2label else None
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_labels, self.num_labels, dtype=torch.int64)

    def update(self, predictions, labels) -> None:
        self.confusion += confusion_matrix(predictions, labels, self.num_labels, self.ignore_index).cpu()

    def add_confusion(self, confusion) -> None:
        confusion = torch.as_tensor(confusion).cpu().long()
        self.confusion += confusion.reshape(-1, self.num_labels, self.num_labels).sum(0)

    def compute(self) -> dict[str, float]:
        return metrics_from_confusion(self.confusion, self.id2label)

    def __call__(self, eval_prediction, compute_result: bool = True) -> dict[str, float] | None:
        predictions = eval_prediction.predictions
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        self.add_confusion(predictions)
        if not compute_result:
            return None
        result = self.compute()
        self.reset()
        return result


def logits_to_label_size(
    logits: torch.Tensor, input_size: Sequence[int], label_size: Sequence[int], patch_size: Sequence[int]
) -> torch.Tensor:
    """Resize (batch, classes, h, w) logits of an input of `input_size` to `label_size`, bilinearly.

    The model pads its input at the bottom and right to a multiple of the patch size, so the logits cover the padded
    input: they are first upsampled to the padded size and cropped to the input, then resized to the labels (the
    original image size when the input was a resized image).
    """
    height, width = input_size
    padded = (math.ceil(height / patch_size[0]) * patch_size[0], math.ceil(width / patch_size[1]) * patch_size[1])
    logits = logits.float()
    if tuple(padded) != (height, width):
        logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)[..., :height, :width]
    if tuple(logits.shape[-2:]) != tuple(label_size):
        logits = F.interpolate(logits, size=tuple(label_size), mode="bilinear", align_corners=False)
    return logits


# ---------------------------------------------------------------------------------------------------------------------
# Trainers
# ---------------------------------------------------------------------------------------------------------------------


def training_steps(args, num_examples: int) -> int:
    """The number of optimizer steps `Trainer.train` takes over `num_examples` training examples (its
    `state.max_steps`): `--max_steps`, or the epochs times the updates per epoch of one process, whose share of the
    batches accelerate rounds up (down with `--dataloader_drop_last`). A scheduler built before the Trainer needs it."""
    if args.max_steps > 0:
        return args.max_steps
    drop_last = args.dataloader_drop_last
    batches = num_examples // args.train_batch_size if drop_last else math.ceil(num_examples / args.train_batch_size)
    per_process = batches // args.world_size if drop_last else math.ceil(batches / args.world_size)
    updates_per_epoch = max(math.ceil(per_process / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * updates_per_epoch)


class OneCycleLR(torch.optim.lr_scheduler.OneCycleLR):
    """torch's `OneCycleLR`, holding its final lr once the cycle is over. The Trainer steps the scheduler after each
    of the `total_steps` optimizer steps, and torch's extrapolates the last one past the end of the annealing, below
    zero: that value trains nothing, but the Trainer logs it."""

    def get_lr(self) -> list[float]:
        if self.last_epoch >= self.total_steps:
            return [group["lr"] for group in self.optimizer.param_groups]
        return super().get_lr()


def one_cycle_optimizers(
    model: torch.nn.Module, args, num_examples: int, div_factor: float = 1e4, final_div_factor: float = 1.0
) -> tuple[torch.optim.Optimizer, OneCycleLR]:
    """`(optimizer, scheduler)` for `Trainer(optimizers=...)`: the Trainer's optimizer (class and settings from `args`,
    no weight decay on biases and norm weights, only trainable parameters) with torch's `OneCycleLR`, the paper's
    schedule (mmcv's OneCycle hook): linear warm-up over `args.get_warmup_steps` steps from lr / div_factor to lr,
    then linear annealing to lr / (div_factor * final_div_factor); momentum and betas untouched.

    None of the Trainer's `lr_scheduler_type`s starts its warm-up above zero, hence this. A one-step warm-up would end
    at the first step, a phase of no step that OneCycleLR cannot have: it is dropped. The Trainer does not take
    `optimizers` under FSDP (use the Trainer's own schedule there).
    """
    from transformers.trainer_pt_utils import get_parameter_names

    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    # The Trainer's rule (`Trainer.get_decay_parameter_names`).
    no_decay = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], no_decay))
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in trainable if name in decay], "weight_decay": args.weight_decay},
        {"params": [p for name, p in trainable if name not in decay], "weight_decay": 0.0},
    ]
    optimizer = optimizer_cls(groups, **optimizer_kwargs)
    total = training_steps(args, num_examples)
    warmup = args.get_warmup_steps(total)
    scheduler = OneCycleLR(
        optimizer,
        max_lr=args.learning_rate,
        total_steps=total,
        pct_start=min(warmup / total, 1.0) if warmup > 1 else 0.0,
        anneal_strategy="linear",
        cycle_momentum=False,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
    )
    return optimizer, scheduler


def script_optimizers(model: torch.nn.Module, args, model_args, train_dataset) -> tuple:
    """`Trainer(optimizers=...)` of the example scripts: `one_cycle_optimizers` with `--lr_schedule one_cycle` (and
    training data), else `(None, None)`, the Trainer's own optimizer and `--lr_scheduler_type`."""
    if model_args.lr_schedule != "one_cycle" or train_dataset is None:
        return None, None
    factors = (model_args.one_cycle_div_factor, model_args.one_cycle_final_div_factor)
    return one_cycle_optimizers(model, args, len(train_dataset), *factors)


class SegmentationTrainer(Trainer):
    """Evaluates semantic segmentation on whole images, at the labels' size, without keeping predictions around.

    Each evaluation batch holds `pixel_values` (the possibly resized images, all of one size: use an evaluation batch
    size of 1 for images of different sizes) and `labels` at the original image size. The logits are resized to the
    labels (`logits_to_label_size`), argmax'ed, and turned into a (1, num_labels, num_labels) confusion matrix, which
    is what the Trainer gathers from the processes and hands to `compute_metrics` (a `SegmentationMetrics`, with
    `batch_eval_metrics=True`). Gathering fixed-size matrices also makes it work data-parallel, where label maps of
    different sizes could not be gathered. The evaluation loss is the cross-entropy of the same resized logits.
    """

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if "labels" not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = inputs["labels"]
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        config = self.accelerator.unwrap_model(model).config
        with torch.no_grad(), self.compute_loss_context_manager():
            logits = model(**model_inputs).logits
            logits = logits_to_label_size(
                logits, inputs["pixel_values"].shape[-2:], labels.shape[-2:], config.patch_size
            )
            loss = F.cross_entropy(logits, labels.long(), ignore_index=config.semantic_loss_ignore_index)
        if prediction_loss_only:
            return loss.detach(), None, None
        predictions = logits.argmax(dim=1)
        confusion = confusion_matrix(predictions, labels, config.num_labels, config.semantic_loss_ignore_index)
        return loss.detach(), confusion[None], torch.ones(1, device=confusion.device, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------------
# Classification helpers
# ---------------------------------------------------------------------------------------------------------------------


class TopKAccuracy:
    """Streaming top-k accuracy for the Trainer's `compute_metrics` (works with and without `batch_eval_metrics`)."""

    def __init__(self, topk: Iterable[int] = (1, 5)):
        self.topk = tuple(topk)
        self.reset()

    def reset(self) -> None:
        self.correct = dict.fromkeys(self.topk, 0)
        self.total = 0

    def update(self, logits, labels) -> None:
        logits, labels = torch.as_tensor(logits), torch.as_tensor(labels, device=torch.as_tensor(logits).device)
        if labels.ndim > 1:  # soft targets
            labels = labels.argmax(-1)
        ranked = logits.topk(min(max(self.topk), logits.shape[-1]), dim=-1).indices
        hits = ranked == labels.reshape(-1, 1)
        for k in self.topk:
            self.correct[k] += int(hits[:, :k].any(-1).sum())
        self.total += int(labels.numel())

    def compute(self) -> dict[str, float]:
        return {f"top{k}_accuracy": self.correct[k] / max(self.total, 1) for k in self.topk}

    def __call__(self, eval_prediction, compute_result: bool = True) -> dict[str, float] | None:
        predictions = eval_prediction.predictions
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        self.update(predictions, eval_prediction.label_ids)
        if not compute_result:
            return None
        result = self.compute()
        self.reset()
        return result


class ClassificationLoss:
    """The Trainer's `compute_loss_func` for classification with Mixup/CutMix and label smoothing (timm's recipe).

    Labels are class indices, or soft targets (batch, num_labels) from Mixup/CutMix. While the model trains, the
    targets are smoothed, `(1 - s) * y + s / num_labels`, which is timm's `Mixup(label_smoothing=s)` (smoothing the
    one-hot targets before mixing gives the same), and the loss is the soft-target cross-entropy. In evaluation the
    loss is the plain cross-entropy. The sum over samples is divided by the Trainer's `num_items_in_batch` (samples
    of the whole accumulated, all-process batch), which the Trainer expects of a `compute_loss_func`.
    """

    def __init__(self, model: torch.nn.Module, label_smoothing: float = 0.0):
        self.model = model
        self.label_smoothing = label_smoothing

    def __call__(self, outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if labels.is_floating_point() and labels.ndim == 2:
            targets = labels.to(torch.float32)
        else:
            targets = labels.long()
        smoothing = self.label_smoothing if self.model.training else 0.0
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing, reduction="sum")
        if num_items_in_batch is None:
            return loss / logits.shape[0]
        count = num_items_in_batch
        if labels.ndim == 2:  # the Trainer counted every entry of the soft targets
            count = count / labels.shape[-1]
        return loss / torch.as_tensor(count, device=loss.device, dtype=loss.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Model loading for the example scripts
# ---------------------------------------------------------------------------------------------------------------------


def parse_config_overrides(overrides: str | None) -> dict:
    """`"hidden_size=32,num_hidden_layers=2,image_size=64"` -> dict, values read as Python literals when possible."""
    import ast

    result = {}
    for item in filter(None, (part.strip() for part in (overrides or "").split(","))):
        if "=" not in item:
            raise ValueError(f"config override {item!r} is not of the form key=value.")
        key, value = (text.strip() for text in item.split("=", 1))
        try:
            result[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            result[key] = value
    return result


def checkpoint_config(name_or_path: str, config_overrides: dict, hub_kwargs: dict):
    """The saved configuration of a Transformers LocAtViT checkpoint with `config_overrides` applied.

    The overrides go through the configuration's constructor, which normalizes and checks them (`patch_size=8` becomes
    (8, 8)); `from_pretrained(..., patch_size=8)` would set them on the loaded configuration as they are, and the model
    would then fail on an integer where it indexes a pair. A new number of classes without names drops the saved
    names, as `from_pretrained(..., num_labels=N)` does.
    """
    from .configuration_locatvit import LocAtViTConfig

    config_dict, _ = LocAtViTConfig.get_config_dict(name_or_path, **hub_kwargs)
    if "num_labels" in config_overrides and "id2label" not in config_overrides:
        config_dict = {key: value for key, value in config_dict.items() if key not in ("id2label", "label2id")}
    return LocAtViTConfig.from_dict({**config_dict, **config_overrides})


def load_locatvit(task: str, name_or_path: str, config_overrides: dict | None = None, hub_kwargs: dict | None = None):
    """A LocAtViT model for `task` ("image-classification" or "semantic-segmentation") from

    - a preset name (`"tiny"`, `"small"`, `"base"`): a new, randomly initialized model (timm's ViT init);
    - a Transformers checkpoint (folder or Hub id) of any LocAtViT head: its weights, with a new head where the
      classes or the head type differ (`ignore_mismatched_sizes`);
    - a checkpoint of the authors' implementation (timm format: `.safetensors`/`.pth` file, folder or Hub id), converted
      on the fly by `locatvit_hf.convert`.

    `config_overrides` (e.g. `num_labels`, `id2label`, `label2id`, and for presets any architecture field) are applied
    to the configuration (for a Transformers checkpoint by `checkpoint_config`).
    """
    from transformers import AutoConfig

    from .configuration_locatvit import PRESETS, LocAtViTConfig
    from .convert import load_converted
    from .modeling_locatvit import LocAtViTForImageClassification, LocAtViTForSemanticSegmentation

    classes = {
        "image-classification": LocAtViTForImageClassification,
        "semantic-segmentation": LocAtViTForSemanticSegmentation,
    }
    if task not in classes:
        raise ValueError(f"unknown task {task!r}: choose one of {sorted(classes)}.")
    model_class = classes[task]
    overrides = dict(config_overrides or {})
    hub_kwargs = dict(hub_kwargs or {})
    if name_or_path in PRESETS:
        return model_class(LocAtViTConfig.from_preset(name_or_path, **overrides))
    path = Path(name_or_path)
    is_transformers_checkpoint = (path / "config.json").is_file() and (
        json.loads((path / "config.json").read_text()).get("model_type") == "locatvit"
    )
    if not is_transformers_checkpoint and not path.exists():
        try:
            is_transformers_checkpoint = (
                AutoConfig.from_pretrained(name_or_path, **hub_kwargs).model_type == "locatvit"
            )
        except (OSError, ValueError, KeyError):
            is_transformers_checkpoint = False
    if is_transformers_checkpoint:
        config = checkpoint_config(name_or_path, overrides, hub_kwargs)
        return model_class.from_pretrained(name_or_path, config=config, ignore_mismatched_sizes=True, **hub_kwargs)
    return load_converted(name_or_path, task, **overrides).train()


__all__ = [
    "ClassificationLoss",
    "GaussianStatsCallback",
    "OneCycleLR",
    "SegmentationMetrics",
    "SegmentationTrainer",
    "TopKAccuracy",
    "accelerator_available",
    "checkpoint_to_resume",
    "confusion_matrix",
    "enable_cpu_data_parallel",
    "install_gaussian_stats",
    "launched_world_size",
    "load_locatvit",
    "logits_to_label_size",
    "metrics_from_confusion",
    "one_cycle_optimizers",
    "script_optimizers",
    "parse_config_overrides",
    "parse_run_arguments",
    "pin_memory_only_with_accelerator",
    "publish",
    "train_and_evaluate",
    "training_steps",
]
