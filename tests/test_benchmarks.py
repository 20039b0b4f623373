"""The speed/memory benchmark script runs end to end (its quick mode) and writes the table it promises. No timing
is asserted here: the ratios live in benchmarks/results*.json and the README."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_speed_quick_run_writes_all_measures(tmp_path):
    output = tmp_path / "results.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_speed.py"), "--quick", "--json", str(output)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    results = json.loads(output.read_text())
    measures = [row["measure"] for row in results["results"]]
    assert measures == [
        "forward, tiny, 224 px, batch 16",
        "forward, tiny, 512 px, batch 2",
        "train step, tiny, 224 px, batch 16",
        "train step, tiny, 512 px, batch 4",
        "train memory, tiny, 512 px, b4, ckpt",
        "train memory, tiny, 512 px, b4",
    ]
    for row in results["results"]:
        values = [value for key, value in row.items() if key != "measure"]
        assert all(value > 0 for value in values if not isinstance(value, list)), row
        unit = "_s" if "train memory" not in row["measure"] else "_mb"
        assert row["ratio"] == row[f"locatvit{unit}"] / row[f"vit{unit}"]
        if "train memory" not in row["measure"]:  # the per-repeat spread comes from the recorded runs, 3 of each
            locatvit_times, vit_times = row["locatvit_times_s"], row["vit_times_s"]
            assert len(locatvit_times) == len(vit_times) == 3 and min(locatvit_times + vit_times) > 0
            assert row["locatvit_s"] == statistics.median(locatvit_times)
            paired = [locatvit / vit for locatvit, vit in zip(locatvit_times, vit_times)]
            assert row["ratio_range"] == [min(paired), max(paired)]
        if "train memory" in row["measure"] and sys.platform == "linux":  # glibc: malloc's bytes in use, too
            assert row["allocated_ratio"] == row["locatvit_allocated_mb"] / row["vit_allocated_mb"]
    assert "threads" in results["machine"] and results["torch"] == __import__("torch").__version__
    assert "ratio" in completed.stdout


def test_accelerator_checks_pass_on_cpu(tmp_path):
    """The accelerator check script (run on a lent GPU for the CUDA paths) compares every path that runs here with
    the float64 reference: all within tolerance, and each training check compared gradients."""
    output = tmp_path / "checks.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "check_accelerator.py"), "--json", str(output)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-2000:]
    checks = json.loads(output.read_text())["checks"]
    from locatvit_hf.attention_locatvit import fused_cpu_attention

    # eager, sdpa, blocked and the fused kernel where it is built
    backends = 4 if fused_cpu_attention() is not None else 3
    # 3 grids x (inference: auto and each backend; training: the same and auto checkpointed)
    assert len(checks) == 3 * ((1 + backends) + (2 + backends))
    for check in checks:
        assert check["passed"] and check["logits"] <= 1e-4, check
        assert (", train," in check["check"]) == ("gradients" in check), check


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the project's git history")
def test_bench_against_commit_runs_the_checkout_against_a_commit(tmp_path):
    """HEAD's package, imported beside this checkout's under renamed operators (both kernels loaded), with the same
    weights: the same code gives bitwise equal logits, and every row's ratio follows from its recorded runs."""
    output = tmp_path / "against.json"
    script = ROOT / "benchmarks" / "bench_against_commit.py"
    command = [sys.executable, str(script), "HEAD", "--only", "tiny, 224", "--repeats", "3", "--json", str(output)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert completed.returncode == 0, completed.stderr[-2000:]
    rows = json.loads(output.read_text())["results"]
    assert [row["measure"] for row in rows] == [
        "forward, tiny, 224 px, batch 16",
        "train step, tiny, 224 px, batch 16",
    ]
    assert rows[0]["logits_difference"] == 0.0 and rows[1]["logits_difference"] is None
    for row in rows:
        paired = [current / earlier for current, earlier in zip(row["current_times_s"], row["reference_times_s"])]
        assert len(paired) == 3 and row["ratio"] == statistics.median(paired)
        low, high = row["ratio_interval"]
        assert min(paired) <= low <= high <= max(paired)  # a bootstrap median is one of the runs' ratios


def test_bench_saved_activations_counts_one_layer(tmp_path):
    """The per-layer accounting of what a training step keeps for backward runs (Triton's interpreter, 64 px): each
    row's totals are the sums of its lines, the Triton operator is among LocAtViT's, and a LocAtViT layer keeps
    exactly what the ViT's keeps plus the attention output's bfloat16 rounding error, one byte per element (17 tokens
    x 192): the Gaussian's statistics and profiles are recomputed in backward, not kept."""
    output = tmp_path / "saved.json"
    script = ROOT / "benchmarks" / "bench_saved_activations.py"
    command = [sys.executable, str(script), "--pixels", "64", "--json", str(output)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    (row,) = json.loads(output.read_text())["results"]
    assert row["locatvit_bytes"] == sum(row["locatvit_by_line"].values())
    assert row["vit_bytes"] == sum(row["vit_by_line"].values())
    assert any("_OPERATORS.forward" in line for line in row["locatvit_by_line"])
    assert row["ratio"] == row["locatvit_bytes"] / row["vit_bytes"]
    assert row["locatvit_bytes"] - row["vit_bytes"] == 17 * 192


def test_bench_traffic_counts_one_layer_per_image(tmp_path):
    """The per-layer, per-image traffic count runs (Triton's interpreter, 64 px): each row's totals are the sums of
    its operators, the profiles' Triton operators are among LocAtViT's with their kernel and absent without it, and
    the kernel moves fewer bytes in fewer operators than the elementwise formula."""
    output = tmp_path / "traffic.json"
    script = ROOT / "benchmarks" / "bench_traffic.py"
    command = [sys.executable, str(script), "--pixels", "64", "--json", str(output)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    kernel, formula = json.loads(output.read_text())["results"]
    assert (kernel["profiles"], formula["profiles"]) == ("kernel", "formula")
    for row in (kernel, formula):
        assert row["locatvit_bytes"] == sum(row["locatvit_by_operator"].values())
        assert row["vit_bytes"] == sum(row["vit_by_operator"].values()) > 0
        assert row["bytes_ratio"] == row["locatvit_bytes"] / row["vit_bytes"]
        assert "locatvit.triton_gaussian_attention" in row["locatvit_by_operator"]
    assert "locatvit.triton_gaussian_profiles_backward" in kernel["locatvit_by_operator"]
    assert not any("profiles" in name for name in formula["locatvit_by_operator"])
    assert kernel["locatvit_bytes"] < formula["locatvit_bytes"]
    assert kernel["locatvit_operators"] < formula["locatvit_operators"]
