"""What one layer of a training step keeps for backward, LocAtViT against transformers' ViT of the same size.

    python benchmarks/bench_saved_activations.py [--backend cuda_triton] [--pixels 224 512] [--json PATH]

The activations kept for backward are the part of training memory that grows with batch and resolution; on a GPU,
where the ViT's flash attention keeps nothing N x N, they are most of what `max_memory_allocated` grows by in a step.
This counts them on any machine: both models' forward passes run in bfloat16 autocast (as people train on GPUs) on
CPU, and every storage an operator made that is still alive after the forward pass (kept by autograd or by selective
checkpointing) is counted once, under the line of model code that made it (weights count too: autocast's bfloat16
copies). A layer's share is the difference between a two-layer and a one-layer model (the embeddings, the head and
LocAtViT's parameter-free refinement are in both). transformers' ViT with `sdpa` on CPU keeps what flash attention
keeps on a GPU (output and log-sum-exp). LocAtViT's backend is forced with `--backend` (default `cuda_triton`, run on
CPU by Triton's interpreter, which this script turns on, with the Gaussian's profiles from their Triton kernel as on
a GPU: slow at 512 px and more, but it keeps what it keeps on a GPU).
"""

import argparse
import json
import os
import traceback
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernel's first call

import bench_speed  # noqa: E402
import torch  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import ViTForImageClassification  # noqa: E402

import locatvit_hf.attention_locatvit as attention  # noqa: E402
import locatvit_hf.modeling_locatvit as modeling  # noqa: E402
from locatvit_hf import LocAtViTConfig, LocAtViTForImageClassification  # noqa: E402

PACKAGES = ("locatvit_hf", "transformers/models/vit")


def build(kind: str, layers: int, backend: str):
    config = LocAtViTConfig.from_preset("tiny", num_labels=10, num_hidden_layers=layers, attention_backend=backend)
    if kind == "locatvit":
        return LocAtViTForImageClassification._from_config(config, attn_implementation="sdpa").train()
    vit_config = bench_speed.vit_config_like(config)
    return ViTForImageClassification._from_config(vit_config, attn_implementation="sdpa").train()


def take_the_gpu_path() -> None:
    """Makes CPU tensors take the path CUDA tensors take: the Triton kernels (attention and profiles, run by the
    interpreter) where the automatic choice takes them, the fused C++ kernel set aside."""
    attention.TRITON_DEVICES = ("cuda", "cpu")
    modeling.fused_cpu_profiles = lambda: None


class AllocationRecorder(TorchDispatchMode):
    """Records every storage an operator returns (once, by a weak reference), with the model code line that ran it."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, str, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(result):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                known = self.storages.get(storage.data_ptr())
                if known is None or known[0].expired():  # an address freed and given out again is a new storage
                    self.storages[storage.data_ptr()] = (StorageWeakRef(storage), where(), storage.nbytes())
        return result

    def alive(self) -> Counter:
        """Bytes of the recorded storages still alive, by line."""
        kept = Counter()
        for reference, line, size in self.storages.values():
            if not reference.expired():
                kept[line] += size
        return kept


def where() -> str:
    """The innermost model code line on the stack."""
    frames = [frame for frame in traceback.extract_stack() if any(p in frame.filename for p in PACKAGES)]
    return f"{Path(frames[-1].filename).name}: {frames[-1].line}" if frames else "elsewhere"


def kept_for_backward(model, pixels: int) -> Counter:
    """Bytes of the storages made by a forward pass that are still alive after it while its graph is (the tensors
    autograd keeps, and those selective checkpointing keeps), by the model code line that made them. Two unrecorded
    passes fill the caches that later passes share: distance tables, the kernels' one-time check, and autocast's
    weight copies (which that check's own autocast context clears)."""
    pixel_values = torch.randn(1, 3, pixels, pixels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            model(pixel_values, interpolate_pos_encoding=True)
        recorder = AllocationRecorder()
        with recorder:
            logits = model(pixel_values, interpolate_pos_encoding=True).logits
    kept = recorder.alive()
    del logits
    return kept


def per_layer(kind: str, pixels: int, backend: str) -> Counter:
    torch.manual_seed(0)
    two, one = (kept_for_backward(build(kind, layers, backend), pixels) for layers in (2, 1))
    two.subtract(one)
    return +two  # drops lines kept only outside the layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cuda_triton", help="LocAtViT's attention backend (forced)")
    parser.add_argument("--pixels", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.backend == "cuda_triton":
        take_the_gpu_path()
    rows = []
    for pixels in args.pixels:
        vit, locatvit = (per_layer(kind, pixels, args.backend) for kind in ("vit", "locatvit"))
        total_vit, total_locatvit = sum(vit.values()), sum(locatvit.values())
        row = dict(
            pixels=pixels, backend=args.backend, vit_bytes=total_vit, locatvit_bytes=total_locatvit,
            ratio=total_locatvit / total_vit, locatvit_by_line=dict(locatvit.most_common()),
            vit_by_line=dict(vit.most_common()),
        )  # fmt: skip
        rows.append(row)
        print(
            f"{pixels} px, batch 1, Tiny, one layer: LocAtViT ({args.backend}) {total_locatvit / 2**20:.2f} MiB, "
            f"ViT {total_vit / 2**20:.2f} MiB, ratio {row['ratio']:.3f}"
        )
        for where, size in locatvit.most_common():
            print(f"    {size / 2**10:8.0f} KiB  {where}")
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
