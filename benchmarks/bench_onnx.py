"""LocAtViT against transformers' ViT of the same size in ONNX Runtime (CPU): latency ratios measured in one run.

    python benchmarks/bench_onnx.py [--sizes tiny,base] [--pixels 224,512] [--batch 1] [--repeats 20] [--threads N]
        [--quick]

Both classifiers are exported statically (`torch.onnx.export(dynamo=True)`) at the measured size, each configured
at that size (hidden size, depth, heads, patch 16 as LocAtViT's preset), and run by ONNX Runtime's CPU provider with
its default graph optimizations (and threads, unless `--threads`). After a warm-up the two sessions run interleaved and the ratio of the
median latencies is reported. `--quick`: Tiny at 224 px, 5 repeats (a smoke run).
"""

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import bench_speed
import onnxruntime
import torch
from transformers import ViTForImageClassification

from locatvit_hf import LocAtViTConfig, LocAtViTForImageClassification


def build(kind: str, size: str, pixels: int) -> torch.nn.Module:
    config = LocAtViTConfig.from_preset(size, num_labels=1000, image_size=pixels)
    if kind == "locatvit":
        return LocAtViTForImageClassification(config).eval()
    vit_config = bench_speed.vit_config_like(config, image_size=pixels)
    return ViTForImageClassification._from_config(vit_config, attn_implementation="sdpa").eval()


def session(kind: str, size: str, pixels: int, batch: int, threads: int, folder: Path):
    """The model exported at (batch, 3, pixels, pixels), loaded in ONNX Runtime on the CPU."""
    path = folder / f"{kind}-{size}-{pixels}.onnx"
    pixel_values = torch.randn(batch, 3, pixels, pixels)
    torch.onnx.export(build(kind, size, pixels), (pixel_values,), str(path), dynamo=True, verbose=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per physical core)
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_ratio(size: str, pixels: int, batch: int, repeats: int, threads: int, folder: Path) -> dict:
    sessions = {kind: session(kind, size, pixels, batch, threads, folder) for kind in ("locatvit", "vit")}
    feed = torch.randn(batch, 3, pixels, pixels).numpy()
    times = {kind: [] for kind in sessions}
    for run in range(repeats + 2):  # interleaved; the first two are warm-up
        for kind, model in sessions.items():
            start = time.perf_counter()
            model.run(None, {model.get_inputs()[0].name: feed})
            if run >= 2:
                times[kind].append(time.perf_counter() - start)
    locatvit_ms, vit_ms = (1000 * statistics.median(times[kind]) for kind in ("locatvit", "vit"))
    return {"locatvit_ms": locatvit_ms, "vit_ms": vit_ms, "ratio": locatvit_ms / vit_ms}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,base", help="LocAtViT presets, comma-separated")
    parser.add_argument("--pixels", default="224,512", help="image sides, comma-separated")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime's intra-op threads (0: its default)")
    parser.add_argument("--quick", action="store_true", help="Tiny at 224 px, 5 repeats (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.pixels, args.repeats = "tiny", "224", 5
    machine = f"{cpu_name()}, {os.cpu_count()} CPUs, {args.threads or 'default'} threads"
    print(
        f"LocAtViT / ViT (transformers), ONNX Runtime {onnxruntime.__version__} CPU, torch {torch.__version__}, {machine}"
    )
    print(f"{'model':<22} {'LocAtViT':>10} {'ViT':>10} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes.split(","):
            for pixels in map(int, args.pixels.split(",")):
                result = latency_ratio(size, pixels, args.batch, args.repeats, args.threads, Path(folder))
                label = f"{size}, {pixels} px, batch {args.batch}"
                print(
                    f"{label:<22} {result['locatvit_ms']:>8.1f}ms {result['vit_ms']:>8.1f}ms {result['ratio']:>6.2f}x"
                )


if __name__ == "__main__":
    main()
