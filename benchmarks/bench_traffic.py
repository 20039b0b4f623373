"""Memory traffic of one layer's training step, per image: LocAtViT on the GPU path against transformers' ViT.

    python benchmarks/bench_traffic.py [--pixels 224 512] [--profiles kernel formula] [--json PATH]

On a GPU, a small vision transformer's training step is bound by memory traffic as much as by its matrix products:
every elementwise operator reads and writes whole tensors. This counts that traffic on any machine: both models run
a bfloat16-autocast training step on CPU, and every operator the step dispatches (views excluded) adds the bytes of
its tensor inputs and outputs, and one to the operator count (about one kernel launch each on a GPU). LocAtViT takes
the path a GPU takes (the Triton kernels, run by Triton's interpreter, which this script turns on), with the
Gaussian's profiles from their kernel (`kernel`) or from the elementwise formula (`formula`, where the profiles
kernel is not chosen). A layer's share is the difference between a two-layer and a one-layer model, per image the
difference between batch 2 and batch 1 (the weights' traffic, which large batches amortize, drops out).

The Triton operators count as one operator each, with the bytes of their arguments and results: what they read and
write at least. transformers' ViT with `sdpa` on CPU calls the flash-attention operator a GPU calls.
"""

import argparse
import json
import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels' first call

import bench_saved_activations  # noqa: E402
import torch  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import locatvit_hf.modeling_locatvit as modeling  # noqa: E402


class TrafficRecorder(TorchDispatchMode):
    """Per operator: calls, and bytes of the tensors it took and returned (views move no data and are skipped)."""

    def __init__(self):
        super().__init__()
        self.calls, self.bytes = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if not func.is_view:
            name = str(func.overloadpacket).removeprefix("aten.")
            self.calls[name] += 1
            tensors = [t for t in pytree.tree_leaves((args, kwargs, result)) if isinstance(t, torch.Tensor)]
            self.bytes[name] += sum(t.numel() * t.element_size() for t in tensors)
        return result


def recorded_step(kind: str, layers: int, batch: int, pixels: int) -> TrafficRecorder:
    """The traffic of one training step (after one unrecorded step, which fills caches and runs the kernels' check)."""
    torch.manual_seed(0)
    model = bench_saved_activations.build(kind, layers, backend=None)
    pixel_values = torch.randn(batch, 3, pixels, pixels)
    recorder = TrafficRecorder()
    for record in (False, True):
        model.zero_grad(set_to_none=True)
        with recorder if record else torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(pixel_values, interpolate_pos_encoding=True).logits.float().square().mean()
        if record:
            with recorder:
                loss.backward()
    return recorder


def per_layer_and_image(kind: str, pixels: int) -> tuple[Counter, Counter]:
    """(operator calls per layer, bytes per layer and image), by operator."""
    steps = {(layers, batch): recorded_step(kind, layers, batch, pixels) for layers in (1, 2) for batch in (1, 2)}
    calls = steps[2, 1].calls.copy()
    calls.subtract(steps[1, 1].calls)
    traffic = steps[2, 2].bytes.copy()
    for sign, key in ((-1, (1, 2)), (-1, (2, 1)), (1, (1, 1))):
        for name, size in steps[key].bytes.items():
            traffic[name] += sign * size
    return +calls, +traffic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pixels", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--profiles", nargs="+", default=["kernel", "formula"], choices=["kernel", "formula"])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    bench_saved_activations.take_the_gpu_path()
    chosen = modeling.triton_profiles
    rows = []
    for pixels in args.pixels:
        vit_calls, vit_bytes = per_layer_and_image("vit", pixels)
        for profiles in args.profiles:
            modeling.triton_profiles = chosen if profiles == "kernel" else (lambda query: None)
            calls, traffic = per_layer_and_image("locatvit", pixels)
            row = dict(
                pixels=pixels, profiles=profiles, vit_bytes=sum(vit_bytes.values()),
                locatvit_bytes=sum(traffic.values()), vit_operators=sum(vit_calls.values()),
                locatvit_operators=sum(calls.values()), locatvit_by_operator=dict(traffic.most_common()),
                vit_by_operator=dict(vit_bytes.most_common()),
            )  # fmt: skip
            row["bytes_ratio"] = row["locatvit_bytes"] / row["vit_bytes"]
            row["operators_ratio"] = row["locatvit_operators"] / row["vit_operators"]
            rows.append(row)
            print(
                f"{pixels} px, Tiny, one layer's training step per image, LocAtViT (profiles: {profiles}) vs ViT: "
                f"{row['locatvit_bytes'] / 2**20:.2f} vs {row['vit_bytes'] / 2**20:.2f} MiB moved, "
                f"ratio {row['bytes_ratio']:.3f}; {row['locatvit_operators']} vs {row['vit_operators']} operators"
            )
            extra = traffic.copy()
            extra.subtract(vit_bytes)
            for name, size in extra.most_common(8):
                if size > 0:
                    print(f"    {size / 2**10:8.0f} KiB more  {name} ({calls[name]} calls, ViT {vit_calls[name]})")
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
