"""Unit tests of locatvit_hf.training (streaming metrics, losses, schedule, Gaussian statistics) and of the examples'
synthetic data."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_scenes import (
    SYNTHETIC_NUM_LABELS,
    make_synthetic_scenes,
    render_synthetic_scene,
    write_synthetic_ade20k,
)
from torch.nn import functional as F
from transformers import HfArgumentParser, Trainer, TrainingArguments

import locatvit_hf.training as training
from locatvit_hf import LocAtViTForImageClassification, LocAtViTForSemanticSegmentation
from locatvit_hf.training import (
    ClassificationLoss,
    GaussianStatsCallback,
    SegmentationMetrics,
    TopKAccuracy,
    confusion_matrix,
    enable_cpu_data_parallel,
    load_locatvit,
    logits_to_label_size,
    one_cycle_optimizers,
    pin_memory_only_with_accelerator,
    training_steps,
)

from .conftest import parameter_digest, tiny_config


def direct_miou(predictions: list[np.ndarray], labels: list[np.ndarray], num_labels: int, ignore: int = 255):
    """IoU per class over all pixels at once, written out directly (no confusion matrix)."""
    pred = np.concatenate([p.reshape(-1) for p in predictions])
    label = np.concatenate([t.reshape(-1) for t in labels])
    valid = label != ignore
    ious = {}
    for c in range(num_labels):
        intersection = np.sum((pred == c) & (label == c) & valid)
        union = np.sum(((pred == c) | (label == c)) & valid)
        if union > 0:
            ious[c] = intersection / union
    accuracy = np.sum((pred == label) & valid) / np.sum(valid)
    return ious, accuracy


def test_streaming_miou_matches_direct_computation():
    rng = np.random.default_rng(0)
    num_labels = 7  # class 5 appears nowhere, class 6 only in the predictions
    metric = SegmentationMetrics(num_labels, ignore_index=255, id2label={i: f"class {i}" for i in range(num_labels)})
    predictions, labels = [], []
    for _ in range(9):
        height, width = rng.integers(5, 40, size=2)  # images of different sizes, one at a time
        label = rng.choice([0, 1, 2, 3, 4, 255], size=(height, width), p=[0.3, 0.2, 0.2, 0.1, 0.1, 0.1])
        prediction = np.where(
            rng.random((height, width)) < 0.6, label, rng.choice([0, 1, 2, 3, 4, 6], (height, width))
        )
        prediction = np.where(prediction == 255, 6, prediction)
        metric.update(torch.from_numpy(prediction), torch.from_numpy(label))
        predictions.append(prediction)
        labels.append(label)
    result = metric.compute()
    ious, accuracy = direct_miou(predictions, labels, num_labels)
    assert 5 not in ious and 6 in ious and ious[6] == 0.0
    assert result["mean_iou"] == pytest.approx(np.mean(list(ious.values())), abs=1e-12)
    assert result["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    for c, iou in ious.items():
        assert result[f"iou_class_{c}"] == pytest.approx(iou, abs=1e-12)
    assert "iou_class_5" not in result  # absent from both: no IoU, not in the mean
    # The state is num_labels**2 counts, and the ignored pixels are not in it.
    assert metric.confusion.shape == (num_labels, num_labels)
    assert int(metric.confusion.sum()) == sum(int((t != 255).sum()) for t in labels)


def test_streaming_miou_as_trainer_batch_metric():
    """The Trainer hands it per-image confusion matrices and asks for the result at the last batch."""

    class EvalPrediction:
        def __init__(self, predictions):
            self.predictions = predictions

    rng = np.random.default_rng(1)
    metric, reference = SegmentationMetrics(4), SegmentationMetrics(4)
    for step in range(5):
        label = torch.from_numpy(rng.integers(0, 4, size=(2, 6, 7)))
        prediction = torch.from_numpy(rng.integers(0, 4, size=(2, 6, 7)))
        reference.update(prediction, label)
        per_image = torch.stack([confusion_matrix(p, t, 4) for p, t in zip(prediction, label)])
        result = metric(EvalPrediction(per_image), compute_result=step == 4)
        assert (result is None) == (step < 4)
    assert result == reference.compute()
    assert int(metric.confusion.sum()) == 0  # reset for the next evaluation


def test_confusion_matrix_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match="label values"):
        confusion_matrix(torch.zeros(3, 3, dtype=torch.long), torch.full((3, 3), 7), num_labels=4)


def test_logits_to_label_size_crops_the_patch_padding():
    # A 20x20 input with patch 8 is padded to 24x24: 3x3 logits cover 24 pixels, of which the first 20 are the image.
    logits = torch.randn(1, 2, 3, 3)
    resized = logits_to_label_size(logits, (20, 20), (40, 40), (8, 8))
    expected = F.interpolate(logits, size=(24, 24), mode="bilinear", align_corners=False)[..., :20, :20]
    expected = F.interpolate(expected, size=(40, 40), mode="bilinear", align_corners=False)
    assert torch.allclose(resized, expected)
    unpadded = logits_to_label_size(logits, (24, 24), (48, 48), (8, 8))
    assert torch.allclose(unpadded, F.interpolate(logits, size=(48, 48), mode="bilinear", align_corners=False))


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    metric = TopKAccuracy((1, 2))
    metric.update(logits, labels)
    assert metric.compute() == {"top1_accuracy": pytest.approx(1 / 3), "top2_accuracy": pytest.approx(2 / 3)}


def test_classification_loss_smoothing_soft_targets_and_normalization():
    model = torch.nn.Linear(1, 1)
    logits = torch.randn(6, 5)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = ClassificationLoss(model, label_smoothing=0.1)
    model.train()
    assert loss({"logits": logits}, labels) == pytest.approx(
        float(F.cross_entropy(logits, labels, label_smoothing=0.1))
    )
    model.eval()  # evaluation: plain cross-entropy
    assert loss({"logits": logits}, labels) == pytest.approx(float(F.cross_entropy(logits, labels)))
    # Soft targets (Mixup): the Trainer counts every entry; the loss is summed over samples and divided by the count.
    model.train()
    soft = F.one_hot(labels, 5).float()
    total = torch.tensor(12 * 5)  # e.g. two accumulated batches of 6 samples
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1, reduction="sum") / 12
    assert loss({"logits": logits}, soft, num_items_in_batch=total) == pytest.approx(float(expected), rel=1e-6)


def one_cycle_factor(step: int, total: int, warmup: int, div_factor: float, final_div_factor: float) -> float:
    """mmcv's OneCycle schedule with linear annealing, written out: from 1 / div_factor at step 0 up to 1 at step
    warmup - 1 (a warm-up of at most one step: no warm-up, the peak at step -1), down to 1 / (div_factor *
    final_div_factor) at step total - 1, held after it."""
    start, end = 1 / div_factor, 1 / (div_factor * final_div_factor)
    peak = warmup - 1 if warmup > 1 else -1
    if step <= peak:
        return start + (1 - start) * step / peak
    return 1 + (end - 1) * min((step - peak) / (total - 1 - peak), 1.0)


@pytest.mark.parametrize(
    ("total", "warmup_ratio", "final_div_factor"), [(100, 0.25, 1.0), (37, 0.25, 10.0), (4, 0.25, 1.0), (6, 0.0, 1.0)]
)
def test_one_cycle_schedule_values(tmp_path, total, warmup_ratio, final_div_factor):
    """The lr of every step (and the one logged after the last), for warm-ups of several steps, of one step (which
    OneCycleLR cannot have as a phase) and of none."""
    args = TrainingArguments(
        tmp_path, learning_rate=1e-3, max_steps=total, warmup_steps=warmup_ratio, report_to="none"
    )
    model = torch.nn.Linear(3, 2)
    optimizer, scheduler = one_cycle_optimizers(model, args, 10, div_factor=1e4, final_div_factor=final_div_factor)
    warmup = args.get_warmup_steps(total)
    for step in range(total + 1):
        expected = 1e-3 * one_cycle_factor(step, total, warmup, 1e4, final_div_factor)
        assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([expected] * 2, rel=1e-9, abs=1e-15)
        if step < total:
            optimizer.step()
            scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3 / (1e4 * final_div_factor), rel=1e-9)


def test_one_cycle_optimizer_is_the_trainers(tmp_path):
    """Same optimizer class, settings and weight-decay groups as `Trainer.create_optimizer`, trainable parameters
    only."""
    model = LocAtViTForSemanticSegmentation(tiny_config())
    model.set_backbone_frozen(True)
    args = TrainingArguments(tmp_path, learning_rate=1e-3, weight_decay=0.01, max_steps=5, report_to="none")
    optimizer, _ = one_cycle_optimizers(model, args, 10)
    reference = Trainer(model=model, args=args).create_optimizer()
    assert type(optimizer) is type(reference)
    for group, expected in zip(optimizer.param_groups, reference.param_groups, strict=True):
        assert [id(p) for p in group["params"]] == [id(p) for p in expected["params"]]
        assert {k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr", "max_lr", "min_lr")} == {
            k: v for k, v in expected.items() if k not in ("params", "lr")
        }
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    assert optimizer.param_groups[0]["weight_decay"] == 0.01 and optimizer.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize(
    "settings",
    [
        dict(max_steps=7),
        dict(num_train_epochs=2.5, gradient_accumulation_steps=3),
        dict(num_train_epochs=3, gradient_accumulation_steps=2, dataloader_drop_last=True),
        dict(num_train_epochs=1),
    ],
)
def test_training_steps_is_the_trainers(tmp_path, settings):
    """`training_steps` counts what the Trainer will (its `max_steps`), which the schedule is built for."""
    args = TrainingArguments(tmp_path, per_device_train_batch_size=4, report_to="none", **settings)
    dataset = [{"pixel_values": torch.zeros(3), "labels": 0}] * 37
    trainer = Trainer(model=torch.nn.Linear(3, 2), args=args, train_dataset=dataset)
    assert (
        training_steps(args, len(dataset))
        == trainer.set_initial_training_values(args, trainer.get_train_dataloader())[-1]
    )


def test_gaussian_stats_callback_logs_the_model_quantities():
    model = LocAtViTForSemanticSegmentation(tiny_config())
    gaussian = model.locatvit.encoder.layers[0].attention.gaussian_bias
    with torch.no_grad():  # away from the initial values (var 1, alpha ln 2)
        gaussian.variance_proj.bias.copy_(torch.tensor([2.0, -1.0]))
        gaussian.strength_proj.bias.fill_(1.5)
    callback = GaussianStatsCallback()
    callback.on_train_begin(None, None, None, model=model)
    pixel_values = torch.randn(3, 3, 32, 32)
    model.train()
    model(pixel_values)  # a training forward (gradients on): recorded
    with torch.no_grad():
        model.eval()(torch.randn(2, 3, 32, 32))  # an evaluation forward: not recorded

        embeddings, grid = model.locatvit.embeddings(pixel_values)
        layer = model.locatvit.encoder.layers[0]
        query = layer.attention.q_proj(layer.layernorm_before(embeddings))
        query = query.view(3, embeddings.shape[1], -1, model.config.head_dim).transpose(1, 2)
        variance, strength = gaussian.variance_and_strength(query[:, :, 1:], grid)

    class State:
        global_step = 1
        log_history = [{"loss": 1.0, "step": 1}]

    logs = {"loss": 1.0}
    callback.on_log(None, State, None, logs=logs)
    assert logs["gauss_var_row/layer_0"] == pytest.approx(float(variance[..., 0].mean()), rel=1e-5)
    assert logs["gauss_var_col/layer_0"] == pytest.approx(float(variance[..., 1].mean()), rel=1e-5)
    assert logs["gauss_alpha/layer_0"] == pytest.approx(float(strength.mean()), rel=1e-5)
    assert logs["gauss_var_row/layer_0"] > 2 * logs["gauss_var_col/layer_0"]
    assert {f"gauss_alpha/layer_{i}" for i in range(2)} <= set(logs)
    assert State.log_history[-1]["gauss_alpha/layer_0"] == logs["gauss_alpha/layer_0"]
    eval_logs = {"eval_loss": 1.0}
    callback.on_log(None, State, None, logs=eval_logs)
    assert eval_logs == {"eval_loss": 1.0}
    callback.on_train_end(None, None, None)
    assert not callback._hooks


def test_synthetic_scenes_are_deterministic_and_consistent():
    first = make_synthetic_scenes(40, seed=3, image_size=48)
    again = make_synthetic_scenes(40, seed=3, image_size=48)
    other = make_synthetic_scenes(40, seed=4, image_size=48)
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) for a, b in zip(first, again))
    assert not all(np.array_equal(a.image, b.image) for a, b in zip(first, other))
    # Scene i does not depend on how many scenes are made.
    assert np.array_equal(render_synthetic_scene(3, 7, 48, 48).image, first[7].image)
    seen = set()
    for scene in first:
        assert scene.image.shape == (48, 48, 3) and scene.image.dtype == np.uint8
        assert scene.mask.max() < SYNTHETIC_NUM_LABELS
        counts = np.bincount(scene.mask.reshape(-1), minlength=SYNTHETIC_NUM_LABELS)
        counts[0] = 0
        assert scene.label == counts.argmax() and counts[scene.label] > 0
        seen |= set(np.unique(scene.mask).tolist())
    assert seen == set(range(SYNTHETIC_NUM_LABELS))


def test_synthetic_ade20k_layout_round_trips_with_reduce_labels(tmp_path):
    root = write_synthetic_ade20k(tmp_path, "training", 3, seed=5, image_size=24, max_image_size=40)
    scenes = make_synthetic_scenes(3, seed=5, image_size=24, max_image_size=40)
    for index, scene in enumerate(scenes):
        name = f"synthetic_training_{index:05d}.png"
        image = np.array(Image.open(root / "images" / "training" / name))
        annotation = np.array(Image.open(root / "annotations" / "training" / name)).astype(np.int64)
        assert np.array_equal(image, scene.image)
        reduced = np.where(annotation == 0, 255, annotation - 1)
        assert (reduced[0] == 255).all() and (reduced[:, -1] == 255).all()
        assert np.array_equal(reduced[1:-1, 1:-1], scene.mask[1:-1, 1:-1])


def test_enable_cpu_data_parallel(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not enable_cpu_data_parallel(HfArgumentParser(TrainingArguments))
    assert "ACCELERATE_USE_CPU" not in os.environ
    monkeypatch.setenv("WORLD_SIZE", "2")
    parser = HfArgumentParser(TrainingArguments)
    enabled = enable_cpu_data_parallel(parser)
    assert enabled == (not torch.cuda.is_available())
    if enabled:
        assert os.environ["ACCELERATE_USE_CPU"] == "true"
        assert parser.get_default("use_cpu") is True


@pytest.mark.parametrize("accelerator", [False, True])
def test_pin_memory_only_with_accelerator(monkeypatch, tmp_path, accelerator):
    """Pinned memory is the default only where there is an accelerator to copy to; the command line still wins."""
    monkeypatch.setattr(training, "accelerator_available", lambda: accelerator)

    def pin_memory(*argv):
        parser = HfArgumentParser(TrainingArguments)
        assert pin_memory_only_with_accelerator(parser) is accelerator
        (args,) = parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), *argv])
        return args.dataloader_pin_memory

    assert pin_memory() is accelerator
    assert pin_memory("--dataloader_pin_memory", str(not accelerator).lower()) is (not accelerator)


def test_load_locatvit_applies_overrides_to_a_checkpoint_through_the_config(tmp_path):
    """Overrides of a saved model's configuration are normalized as the constructor does (an integer `patch_size`
    becomes a pair), and new class names replace the checkpoint's, for another head type too."""
    LocAtViTForImageClassification(tiny_config(num_labels=8)).save_pretrained(tmp_path)
    id2label = {index: f"class {index}" for index in range(3)}
    label2id = {name: index for index, name in id2label.items()}
    overrides = {"patch_size": 8, "num_labels": 3, "id2label": id2label, "label2id": label2id}
    model = load_locatvit("semantic-segmentation", str(tmp_path), overrides)
    assert tuple(model.config.patch_size) == (8, 8) and model.config.id2label == id2label
    assert model(torch.randn(1, 3, 32, 32)).logits.shape == (1, 3, 4, 4)
    relabelled = load_locatvit("image-classification", str(tmp_path), {"num_labels": 2})
    assert relabelled.config.num_labels == 2 and relabelled.classifier.out_features == 2


def test_parameter_digest():
    model = LocAtViTForSemanticSegmentation(tiny_config())
    copy = LocAtViTForSemanticSegmentation(tiny_config())
    copy.load_state_dict(model.state_dict())
    assert parameter_digest(model) == parameter_digest(copy)
    with torch.no_grad():
        copy.decode_head.classifier.bias[0] += 1e-7
    assert parameter_digest(model) != parameter_digest(copy)
