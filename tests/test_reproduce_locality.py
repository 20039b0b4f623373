"""examples/reproduce_locality.py at a toy size: data, the four variants, both Trainer scripts, results, caching."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from synthetic_scenes import SYNTHETIC_CLASS_NAMES, render_synthetic_scene

from locatvit_hf.training import parse_config_overrides

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "reproduce_locality.py"
TOY = [
    "--train_images", "24", "--eval_images", "8", "--image_size", "32", "--patch_size", "8",
    "--hidden_size", "16", "--num_layers", "2", "--num_heads", "2", "--mlp_ratio", "2",
    "--decoder_hidden_size", "8", "--pretrain_steps", "3", "--probe_steps", "2",
    "--pretrain_batch_size", "8", "--probe_batch_size", "8",
]  # fmt: skip
SWITCHES = {
    "vit": (False, False),
    "gaug": (True, False),
    "prr": (False, True),
    "locatvit": (True, True),
}


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce_locality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy_run(reproduce, tmp_path_factory):
    """All four variants, two seeds, in this process (`--workers 0`)."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    output_dir = tmp_path_factory.mktemp("reproduce") / "out"
    argv = ["--output_dir", str(output_dir), "--seeds", "0", "1", "--variants", *SWITCHES, "--workers", "0", *TOY]
    report = reproduce.main(argv)
    return output_dir, argv, report


def test_the_four_variants_differ_only_in_the_two_switches(reproduce):
    args = reproduce.build_parser().parse_args([])
    assert args.variants == ["vit", "locatvit"] and args.seeds == list(range(8))  # 8 paired seeds by default
    overrides = {variant: parse_config_overrides(reproduce.model_overrides(args, variant)) for variant in SWITCHES}
    for variant, (gaug, prr) in SWITCHES.items():
        assert overrides[variant]["use_gaussian_attention"] is gaug
        assert overrides[variant]["use_patch_refinement"] is prr
        shared = {k: v for k, v in overrides[variant].items() if not k.startswith("use_")}
        assert shared == {k: v for k, v in overrides["vit"].items() if not k.startswith("use_")}
    data = {"classification": Path("c"), "ade": Path("a"), "class_names": Path("n"), "cache": Path("h")}
    line = reproduce.pretrain_args(args, 0, data, Path("init"), Path("out"))
    assert line[line.index("--model_name_or_path") + 1] == "init"  # the variant is in the initial checkpoint
    probe = reproduce.probe_args(args, 0, data, Path("start"), Path("out"))
    assert probe[probe.index("--model_name_or_path") + 1] == "start"
    assert "--full_finetune" not in probe  # frozen backbone: the script's default


def test_data_is_deterministic_and_shared_by_both_phases(toy_run):
    output_dir, _, _ = toy_run
    data = output_dir / "data"
    names = json.loads((data / "class_names.json").read_text())
    assert names == list(SYNTHETIC_CLASS_NAMES)
    images = sorted((data / "ade" / "images" / "training").glob("*.png"))
    assert len(images) == 24 and len(list((data / "ade" / "images" / "validation").glob("*.png"))) == 8
    classification = {p.name: p.parent.name for p in (data / "classification" / "train").glob("*/*.png")}
    assert len(classification) == 24
    for index, path in enumerate(images):
        scene = render_synthetic_scene(0, index, 32, 32)  # training scenes: (data_seed, i)
        np.testing.assert_array_equal(np.array(Image.open(path)), scene.image)
        mask = np.array(Image.open(data / "ade" / "annotations" / "training" / path.name))
        np.testing.assert_array_equal(mask, scene.mask)
        # The classification copy is the same file, in the folder of the image label (the largest object).
        assert classification[path.name] == names[scene.label].replace(" ", "_")
        cls_path = data / "classification" / "train" / classification[path.name] / path.name
        assert cls_path.read_bytes() == path.read_bytes()
    held_out = render_synthetic_scene(1, 0, 32, 32)  # held-out scenes: (data_seed + 1, i)
    np.testing.assert_array_equal(
        np.array(Image.open(data / "ade" / "images" / "validation" / "scene_00000.png")), held_out.image
    )


def test_every_run_trained_its_variant_and_probed_a_frozen_backbone(toy_run):
    output_dir, _, report = toy_run
    runs = output_dir / "runs"
    for variant, (gaug, prr) in SWITCHES.items():
        for seed in (0, 1):
            pretrain, probe = runs / variant / f"seed{seed}" / "pretrain", runs / variant / f"seed{seed}" / "probe"
            pre_config = json.loads((pretrain / "config.json").read_text())
            assert (pre_config["use_gaussian_attention"], pre_config["use_patch_refinement"]) == (gaug, prr)
            assert pre_config["hidden_size"] == 16 and pre_config["num_hidden_layers"] == 2
            assert pre_config["architectures"] == ["LocAtViTForImageClassification"]
            probe_config = json.loads((probe / "config.json").read_text())
            assert probe_config["architectures"] == ["LocAtViTForSemanticSegmentation"]
            assert list(probe_config["id2label"].values()) == list(SYNTHETIC_CLASS_NAMES)
            assert probe_config["freeze_backbone"] is True
            assert (probe_config["use_gaussian_attention"], probe_config["use_patch_refinement"]) == (gaug, prr)
            assert json.loads((pretrain / "all_results.json").read_text())["train_global_step"] == 3
            assert json.loads((probe / "all_results.json").read_text())["train_global_step"] == 2
            # The probe started from the pre-trained backbone and left it untouched.
            before, after = load_file(pretrain / "model.safetensors"), load_file(probe / "model.safetensors")
            backbone = [key for key in after if key.startswith("locatvit.")]  # all but the classifier's final norm
            assert {key for key in before if key.startswith("locatvit.") and ".layernorm." not in key} == set(backbone)
            assert len(backbone) > 10 and all(torch.equal(before[k], after[k]) for k in backbone)
            assert any("gaussian_bias" in key for key in backbone) is gaug
            assert not list(pretrain.glob("checkpoint-*"))  # removed once the run finished
    expected = {(v, s) for v in (*SWITCHES, "vit_random_init") for s in (0, 1)}
    assert {(r["variant"], r["seed"]) for r in report["runs"]} == expected


def test_the_variants_of_a_seed_start_from_the_same_network(toy_run):
    output_dir, _, _ = toy_run
    runs = output_dir / "runs"
    for seed in (0, 1):
        plain = load_file(runs / "vit" / f"seed{seed}" / "init" / "model.safetensors")
        for variant, (gaug, _) in SWITCHES.items():
            initial = load_file(runs / variant / f"seed{seed}" / "init" / "model.safetensors")
            assert all(torch.equal(plain[key], initial[key]) for key in plain)
            assert {key for key in initial if key not in plain} == (
                {key for key in initial if "gaussian_bias" in key} if gaug else set()
            )
            assert any("gaussian_bias" in key for key in initial) is gaug
            stamp = json.loads((runs / variant / f"seed{seed}" / "pretrain" / "reproduce_run.json").read_text())
            argv = stamp["argv"]
            assert argv[argv.index("--model_name_or_path") + 1] == str(runs / variant / f"seed{seed}" / "init")
    first, second = (load_file(runs / "vit" / f"seed{seed}" / "init" / "model.safetensors") for seed in (0, 1))
    key = "locatvit.encoder.layers.0.attention.q_proj.weight"
    assert not torch.equal(first[key], second[key])  # seeded by the run seed


def test_gaussian_statistics_before_and_after_pretraining(toy_run):
    output_dir, _, report = toy_run
    for run in report["runs"]:
        gaug = run["variant"] in SWITCHES and SWITCHES[run["variant"]][0]
        assert ("gaussians" in run) is gaug
        if not gaug:
            continue
        start, end = run["gaussians"]["start"], run["gaussians"]["end"]
        assert [layer["layer"] for layer in start] == [layer["layer"] for layer in end] == [0, 1]
        for before in start:  # the initialization: variance about one patch², strength about softplus(0) = ln 2
            assert 0.5 < before["variance_row"] < 2 and 0.5 < before["variance_col"] < 2
            assert before["strength"] == pytest.approx(np.log(2), abs=0.05)
            assert before["log_variance_std"] >= 0
        assert start != end  # three steps of pre-training moved them
    table = (output_dir / "results.md").read_text()
    assert "Gaussians of LocAtViT (GAug + PRR), start → end" in table and "Gaussians of ViT + PRR" not in table
    summary = report["summary"]["locatvit"]["gaussians"]
    runs = [r for r in report["runs"] if r["variant"] == "locatvit"]
    expected = np.mean([r["gaussians"]["end"][1]["strength"] for r in runs])
    assert summary["end"][1]["strength"] == pytest.approx(expected)


def test_random_init_reference_probes_the_untrained_plain_vit(toy_run):
    output_dir, _, report = toy_run
    for seed in (0, 1):
        base = output_dir / "runs" / "vit_random_init" / f"seed{seed}"
        config = json.loads((base / "init" / "config.json").read_text())
        assert (config["use_gaussian_attention"], config["use_patch_refinement"]) == (False, False)
        assert config["hidden_size"] == 16 and not (base / "pretrain").exists()
        initial, probed = (
            load_file(base / "init" / "model.safetensors"),
            load_file(base / "probe" / "model.safetensors"),
        )
        assert all(torch.equal(initial[k], probed[k]) for k in probed if k.startswith("locatvit."))
        # The very network the plain ViT of this seed starts its pre-training from.
        plain = output_dir / "runs" / "vit" / f"seed{seed}" / "init" / "model.safetensors"
        assert (base / "init" / "model.safetensors").read_bytes() == plain.read_bytes()
    entry = report["summary"]["vit_random_init"]
    assert entry["pretrained"] is False and "top1" not in entry and "delta_mean_iou" in entry


def test_probe_starts_from_the_pretrained_backbone_with_a_finite_seeded_head(toy_run, reproduce, tmp_path):
    output_dir, _, _ = toy_run
    pretrain = output_dir / "runs" / "gaug" / "seed1" / "pretrain"
    start = output_dir / "runs" / "gaug" / "seed1" / "probe_start"
    before, weights = load_file(pretrain / "model.safetensors"), load_file(start / "model.safetensors")
    backbone = {k for k in weights if k.startswith("locatvit.")}
    # The pre-trained encoder, without the final norm that only the classifier reads.
    assert backbone == {k for k in before if k.startswith("locatvit.") and not k.startswith("locatvit.layernorm.")}
    assert all(torch.equal(before[k], weights[k]) for k in backbone)
    head = {k: v for k, v in weights.items() if k.startswith("decode_head.")}
    assert all(torch.isfinite(v).all() for v in head.values())
    assert 0.01 < float(head["decode_head.projection.weight"].std()) < 0.03  # truncated normal 0.02
    assert not head["decode_head.classifier.bias"].any()
    config = json.loads((start / "config.json").read_text())
    assert config["architectures"] == ["LocAtViTForSemanticSegmentation"] and len(config["id2label"]) == 9
    # Deterministic for a seed (the probe's cache key), different for another seed.
    names = list(SYNTHETIC_CLASS_NAMES)
    again = reproduce.probe_start(pretrain, names, 1, tmp_path / "again")
    assert reproduce.file_digest(again) == reproduce.file_digest(start)
    other = reproduce.probe_start(pretrain, names, 2, tmp_path / "other")
    assert reproduce.file_digest(other) != reproduce.file_digest(start)


def test_results_table_json_and_chart(toy_run, reproduce):
    output_dir, _, report = toy_run
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(report["summary"]))
    assert saved["wall_seconds"] > 0 and "logical CPUs" in saved["machine"]
    summary = saved["summary"]
    assert list(summary) == ["vit_random_init", *SWITCHES]
    for variant, entry in summary.items():
        runs = [r for r in saved["runs"] if r["variant"] == variant]
        ious = [r["mean_iou"] for r in runs]
        assert all(0.0 <= value <= 1.0 for value in ious) and len(runs) == 2
        assert entry["mean_iou"]["mean"] == pytest.approx(np.mean(ious))
        assert entry["mean_iou"]["std"] == pytest.approx(np.std(ious, ddof=1))
        if variant in SWITCHES:
            assert entry["top1"]["mean"] == pytest.approx(np.mean([r["top1"] for r in runs]))
        if variant != "vit":  # differences to the plain ViT, paired by seed
            baseline = {r["seed"]: r["mean_iou"] for r in saved["runs"] if r["variant"] == "vit"}
            deltas = np.array([r["mean_iou"] - baseline[r["seed"]] for r in runs])
            delta = entry["delta_mean_iou"]
            assert delta["mean"] == pytest.approx(deltas.mean())
            assert delta["per_seed"] == {str(r["seed"]): pytest.approx(d) for r, d in zip(runs, deltas)}
            assert (delta["better"], delta["worse"]) == (int((deltas > 0).sum()), int((deltas < 0).sum()))
            # Two seeds: the paired t interval has t(0.975, 1 dof) = 12.706 standard errors on each side.
            half_width = 12.7062 * deltas.std(ddof=1) / np.sqrt(2)
            assert delta["ci95"] == pytest.approx([deltas.mean() - half_width, deltas.mean() + half_width], abs=1e-6)
    table = (output_dir / "results.md").read_text()
    random_row = next(line for line in table.splitlines() if line.startswith("| ViT, random init"))
    assert random_row.split(" | ")[3] == "–"  # no top-1: it was not trained
    for variant in SWITCHES:
        name = reproduce.VARIANTS[variant]["name"]
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert (
            f"{100 * summary[variant]['mean_iou']['mean']:.1f} ± {100 * summary[variant]['mean_iou']['std']:.1f}"
            in row
        )
    assert "± " in table and "seed 1" in table and "95 % confidence interval" in table
    delta = summary["locatvit"]["delta_mean_iou"]
    low, high = (100 * value for value in delta["ci95"])
    assert f"{100 * delta['mean']:+.1f} [{low:+.1f}, {high:+.1f}] ({delta['better']}/{delta['worse']})" in table
    assert next(line for line in table.splitlines() if line.startswith("| Δ mIoU, LocAtViT (GAug + PRR) − ViT"))
    # Provenance: the versions and the commit of the runs, in the JSON and in the table's header.
    stamp = saved["provenance"]
    assert stamp == reproduce.provenance() and stamp["torch"] == torch.__version__
    assert all(run["provenance"] == stamp for run in saved["runs"])
    assert f"torch {torch.__version__}" in table and f"commit {stamp['commit'][:12]}" in table
    chart = output_dir / "results.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figures = sorted(p.name for p in (output_dir / "figures").glob("*.png"))
    assert figures == ["attention_map.png", "gaussian_statistics.png", "segmentation.png"]


def test_bar_chart_axes(toy_run, reproduce, tmp_path):
    output_dir, _, report = toy_run
    figure = reproduce.bar_chart(report["summary"], report["runs"], tmp_path / "chart.png", "title")
    top1_ax, iou_ax = figure.axes
    # One bar per variant; the random-init reference only in the mIoU panel.
    assert len(top1_ax.patches) == 4 and len(iou_ax.patches) == 5
    heights = [bar.get_height() for bar in iou_ax.patches]
    order = ["vit_random_init", *SWITCHES]
    assert heights == pytest.approx([100 * report["summary"][v]["mean_iou"]["mean"] for v in order])
    assert [bar.get_height() for bar in top1_ax.patches] == pytest.approx(
        [100 * report["summary"][v]["top1"]["mean"] for v in SWITCHES]
    )
    labels = ["ViT,\nrandom init", "ViT", "ViT + GAug", "ViT + PRR", "LocAtViT"]
    assert [t.get_text() for t in iou_ax.get_xticklabels()] == labels
    assert (tmp_path / "chart.png").is_file()


def test_a_second_start_reuses_finished_runs(toy_run, reproduce):
    output_dir, argv, report = toy_run
    model = output_dir / "runs" / "locatvit" / "seed1" / "probe" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    again = reproduce.main(argv + ["--no_figures"])
    assert model.stat().st_mtime_ns == stamp  # not retrained
    assert again["summary"] == report["summary"]
    # A changed probe setting retrains the probes only, of the runs asked for.
    pretrained = output_dir / "runs" / "vit" / "seed0" / "pretrain" / "model.safetensors"
    pre_stamp = pretrained.stat().st_mtime_ns
    changed = argv + ["--no_figures", "--variants", "vit", "--seeds", "0", "--probe_steps", "1"]
    changed_report = reproduce.main(changed)
    assert pretrained.stat().st_mtime_ns == pre_stamp
    assert [(r["variant"], r["probe_steps"]) for r in changed_report["runs"]] == [("vit", 1), ("vit_random_init", 1)]


def test_a_rerun_gives_the_same_numbers(toy_run, reproduce, tmp_path):
    """Determinism: seed 1 of ViT and LocAtViT again, in a new folder, after the other runs of this process."""
    output_dir, argv, report = toy_run
    again_dir = tmp_path / "again"
    rerun = argv[: argv.index("--seeds")] + argv[argv.index("--workers") :]
    rerun[1] = str(again_dir)
    again = reproduce.main([*rerun, "--seeds", "1", "--variants", "vit", "locatvit", "--no_figures"])
    first = {(r["variant"], r["seed"]): r for r in report["runs"]}
    for run in again["runs"]:
        recorded = first[(run["variant"], run["seed"])]
        for key in ("top1", "mean_iou", "pixel_accuracy", "class_iou", "pretrain_loss", "probe_loss", "gaussians"):
            assert run.get(key) == recorded.get(key), (run["variant"], key)
        phases = ("pretrain", "probe") if run["variant"] != "vit_random_init" else ("probe",)
        for phase in phases:
            path = Path("runs") / run["variant"] / f"seed{run['seed']}" / phase / "model.safetensors"
            assert (again_dir / path).read_bytes() == (output_dir / path).read_bytes()


def test_runs_of_other_versions_are_retrained_not_mixed(toy_run, reproduce, tmp_path):
    output_dir, argv, _ = toy_run
    probe = output_dir / "runs" / "vit" / "seed1" / "probe"
    stamp = json.loads((probe / "reproduce_run.json").read_text())
    stamp["provenance"] = {**stamp["provenance"], "torch": "1.0.0"}
    (probe / "reproduce_run.json").write_text(json.dumps(stamp))
    before = (probe / "model.safetensors").stat().st_mtime_ns
    report = reproduce.main(argv + ["--no_figures", "--variants", "vit", "--seeds", "1", "--no_random_init_baseline"])
    assert (probe / "model.safetensors").stat().st_mtime_ns != before  # retrained under the current versions
    assert report["runs"][0]["provenance"] == reproduce.provenance()
    older = {**report["runs"][0], "provenance": stamp["provenance"]}
    with pytest.raises(ValueError, match="different sets of versions.*--force"):
        reproduce.common_provenance([report["runs"][0], older])


def test_command_line_runs_the_scripts_as_subprocesses(tmp_path):
    """The default mode: each phase a subprocess of the example script, two at a time."""
    output_dir = tmp_path / "cli"
    argv = ["--output_dir", str(output_dir), "--variants", "vit", "locatvit", "--seeds", "3", "--no_figures", *TOY]
    argv.append("--no_random_init_baseline")
    env = {**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *argv, "--workers", "2"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| ViT |" in result.stdout and "| LocAtViT (GAug + PRR) |" in result.stdout
    report = json.loads((output_dir / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in report["runs"]] == [("vit", 3), ("locatvit", 3)]
    log = (output_dir / "runs" / "locatvit" / "seed3" / "probe" / "log.txt").read_text()
    assert log.startswith("$ ") and "run_semantic_segmentation.py" in log.splitlines()[0]
    assert (output_dir / "results.png").is_file()
