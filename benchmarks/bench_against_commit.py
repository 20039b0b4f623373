"""LocAtViT of this checkout against LocAtViT of another commit, in one process: does a change cost speed?

    python benchmarks/bench_against_commit.py REV [--repeats 30] [--only REGEX] [--json PATH]

The package of commit REV (`git archive`) is imported as `locatvit_ref`, with its operator namespaces renamed so that
both sets of kernels load side by side, and both models get the same weights. The rows are bench_speed.py's time
rows (`CASES`, or `CUDA_CASES` on a GPU), each model on its automatic attention backend. Every repeat times both
models in random order; a row reports their medians and the median of the per-repeat ratios (this checkout over REV)
with a bootstrap 95 % interval, and, for inference, the largest difference of their logits. On a machine whose speed
drifts by more than the difference sought, this resolves a few percent where separate runs of bench_speed.py cannot.
Base rows take half the repeats (at least 12).
"""

import argparse
import importlib
import json
import random
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import bench_speed
import torch

from locatvit_hf import LocAtViTConfig, LocAtViTForImageClassification

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "locatvit_ref"
# The names both packages would register: custom operators (`locatvit::`) and the kernel's TORCH_LIBRARY namespace
# and extension (`locatvit_cpu_...`).
RENAMES = [
    (re.compile(r"\blocatvit::"), f"{REFERENCE}::"),
    (re.compile(r"\btorch\.ops\.locatvit\b"), f"torch.ops.{REFERENCE}"),
    (re.compile(r"\blocatvit_cpu_"), f"{REFERENCE}_cpu_"),
]


def import_reference(revision: str, directory: Path):
    """The package `src/locatvit_hf` of `revision`, imported as `locatvit_ref` with its registered names renamed."""
    archive = directory / "reference.tar"
    subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--output", str(archive), revision, "src/locatvit_hf"], check=True
    )
    with tarfile.open(archive) as tar:
        tar.extractall(directory, filter="data")
    package = directory / REFERENCE
    (directory / "src" / "locatvit_hf").rename(package)
    for path in package.rglob("*"):
        if path.suffix in (".py", ".cpp"):
            text = path.read_text()
            for pattern, replacement in RENAMES:
                text = pattern.sub(replacement, text)
            path.write_text(text)
    sys.path.insert(0, str(directory))
    return importlib.import_module(REFERENCE)


def models(reference, size: str) -> dict:
    """This checkout's classifier and the reference's, with the same weights."""
    current = LocAtViTForImageClassification._from_config(
        LocAtViTConfig.from_preset(size, num_labels=1000), attn_implementation="sdpa"
    )
    config = reference.LocAtViTConfig.from_preset(size, num_labels=1000)
    earlier = reference.LocAtViTForImageClassification._from_config(config, attn_implementation="sdpa")
    earlier.load_state_dict(current.state_dict())
    return {"current": current.to(bench_speed.DEVICE), "reference": earlier.to(bench_speed.DEVICE)}


def logits_difference(pair: dict, pixels: int) -> float:
    pixel_values = torch.randn(1, 3, pixels, pixels, device=bench_speed.DEVICE)
    with torch.inference_mode(), bench_speed.autocast():
        logits = [model.eval()(pixel_values, interpolate_pos_encoding=pixels != 224).logits for model in pair.values()]
    return (logits[0] - logits[1]).abs().max().item()


def compare(pair: dict, pixels: int, batch: int, mode: str, repeats: int, rng: random.Random) -> dict:
    steps = {kind: bench_speed.make_step(model, pixels, batch, mode) for kind, model in pair.items()}
    times = bench_speed.interleaved_times(steps, repeats, lambda _: rng.sample(list(steps), len(steps)))
    paired = [current / earlier for current, earlier in zip(times["current"], times["reference"])]
    medians = sorted(statistics.median(rng.choices(paired, k=len(paired))) for _ in range(2000))
    return {
        "current_s": statistics.median(times["current"]),
        "reference_s": statistics.median(times["reference"]),
        "ratio": statistics.median(paired),
        "ratio_interval": [medians[49], medians[1950]],
        "current_times_s": times["current"],
        "reference_times_s": times["reference"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revision", help="the commit to compare against, e.g. HEAD~3 or a hash")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--only", help="measure only the rows whose label matches this regular expression")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rng = random.Random(0)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        reference = import_reference(args.revision, Path(directory))
        print(f"LocAtViT of this checkout / of {args.revision}, torch {torch.__version__}, {bench_speed.DEVICE}")
        print(f"{'measure':<34} {'current':>10} {args.revision[:10]:>10} {'ratio':>7}  95 % interval  logits diff")
        for name, size, pixels, batch, mode, _ in (
            bench_speed.CUDA_CASES if bench_speed.DEVICE == "cuda" else bench_speed.CASES
        ):
            label = f"{name}, {size}, {pixels} px, batch {batch}"
            if args.only and not re.search(args.only, label):
                continue
            torch.manual_seed(0)
            pair = models(reference, size)
            difference = logits_difference(pair, pixels) if mode == "inference" else None
            repeats = args.repeats if size == "tiny" else max(args.repeats // 2, 12)
            row = {
                "measure": label,
                **compare(pair, pixels, batch, mode, repeats, rng),
                "logits_difference": difference,
            }
            rows.append(row)
            low, high = row["ratio_interval"]
            print(
                f"{label:<34} {row['current_s'] * 1e3:>8.1f}ms {row['reference_s'] * 1e3:>8.1f}ms {row['ratio']:>6.3f}x"
                f"  [{low:.3f}, {high:.3f}]  {'' if difference is None else f'{difference:.1e}'}"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"revision": args.revision, "torch": torch.__version__, "results": rows})
        )


if __name__ == "__main__":
    main()
