"""LocAtViT against transformers' ViT of the same size: time and memory ratios measured in one run.

    python benchmarks/bench_speed.py [--repeats 7] [--json benchmarks/results.json] [--quick] [--high-res] [--only REGEX]
        [--backend NAME]

Both models use `sdpa`, the same hidden size, depth, heads, patch and configured image size (224); other resolutions
go through `interpolate_pos_encoding=True`, as when fine-tuning or segmenting at 512 px. Runs are interleaved after a
warm-up (who goes first alternates) and the ratio of the medians is reported, with the range of the per-repeat ratios
(each LocAtViT run over the ViT run beside it): a row whose range is wide was measured while the machine's speed
moved. Training memory is measured for each model in a fresh subprocess: peak RSS sampled during one training step
minus the RSS just before it on CPU (`max_memory_allocated` minus the allocation before it on CUDA), so it counts
activations, gradients and optimizer state, not the libraries; the median of five such subprocesses per model is
reported (one on CUDA, where it does not vary). `--high-res` adds inference at 1024 and 2048 px and training at 1024
px. LocAtViT's attention backend is chosen automatically (`attention_backend=None`) unless `--backend` forces one,
e.g. `--backend sdpa` for the mask path. On a GPU the rows are `CUDA_CASES` (batch sizes people train with, in
bfloat16 autocast for both models), e.g. `python benchmarks/bench_speed.py --backend cuda_triton`.

On CPU, glibc returns large freed blocks to the system, and every reuse then pays a page fault per 4 KB: a sizeable,
run-to-run varying share of both models' time on small machines. To measure without it (as with a caching allocator),
run with `MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824`; the setting is recorded in the output.
"""

import argparse
import contextlib
import ctypes
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch
from transformers import ViTConfig, ViTForImageClassification

from locatvit_hf import LocAtViTConfig, LocAtViTForImageClassification
from locatvit_hf.attention_locatvit import select_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (name, size, pixels, batch, mode, LocAtViT's attention backend: "auto" or a name; both models use sdpa)
CASES = [
    ("forward", "tiny", 224, 16, "inference", "auto"),
    ("forward", "tiny", 512, 2, "inference", "auto"),
    ("forward", "base", 224, 16, "inference", "auto"),
    ("forward", "base", 512, 2, "inference", "auto"),
    ("train step", "tiny", 224, 16, "training", "auto"),
    ("train step", "tiny", 512, 4, "training", "auto"),
]
# (size, pixels, batch, LocAtViT's attention backend)
MEMORY_CASES = [("tiny", 512, 4, "auto")]
# On a GPU, the batch sizes people train with, in bfloat16 autocast (both models); the automatic choice runs the
# Triton kernel where its check passes, `--backend cuda_chunked` the chunked path it replaces. Targets: training 1.15x
# at 224 px and 1.25x at 512/1024 px, forward 1.10x, memory 1.05x.
CUDA_CASES = [
    ("train step", "tiny", 224, 256, "training", "auto"),
    ("train step", "base", 224, 64, "training", "auto"),
    ("train step", "tiny", 512, 32, "training", "auto"),
    ("train step", "tiny", 1024, 8, "training", "auto"),
    ("forward", "base", 224, 64, "inference", "auto"),
    ("forward", "tiny", 512, 32, "inference", "auto"),
]
CUDA_MEMORY_CASES = [("tiny", 512, 32, "auto"), ("tiny", 1024, 8, "auto")]


def high_res_cases() -> tuple[list, list]:
    """Inference at 1024 and 2048 px (16,385 tokens: where keys go in chunks) and training at 1024 px."""
    cases = [
        ("forward", "tiny", 1024, 1, "inference", "auto"),
        ("forward", "tiny", 2048, 1, "inference", "auto"),
        ("train step", "tiny", 1024, 1, "training", "auto"),
    ]
    return cases, [("tiny", 1024, 1, "auto")]


def vit_config_like(config: LocAtViTConfig, image_size: int = 224) -> ViTConfig:
    """transformers' ViT of the size of `config`: hidden size, depth, heads, MLP width, patch 16, labels."""
    return ViTConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        image_size=image_size,
        patch_size=16,
        layer_norm_eps=1e-6,
        num_labels=config.num_labels,
    )


def build(kind: str, size: str, gradient_checkpointing: bool = False, attention: str = "auto"):
    backend = None if attention == "auto" else attention
    config = LocAtViTConfig.from_preset(size, num_labels=1000, attention_backend=backend)
    if kind == "vit":
        model = ViTForImageClassification._from_config(vit_config_like(config), attn_implementation="sdpa")
    else:
        model = LocAtViTForImageClassification._from_config(config, attn_implementation="sdpa")
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model.to(DEVICE)


def autocast():
    """bfloat16 autocast on a GPU, as people train there; float32 on CPU."""
    if DEVICE == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(model, pixels: int, batch: int, mode: str):
    x = torch.randn(batch, 3, pixels, pixels, device=DEVICE)
    labels = torch.randint(0, 1000, (batch,), device=DEVICE)
    interpolate = pixels != 224
    if mode == "inference":
        model.eval()

        def step():
            with torch.inference_mode(), autocast():
                model(x, interpolate_pos_encoding=interpolate)

        return step
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with autocast():
            loss = model(x, labels=labels, interpolate_pos_encoding=interpolate).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step) -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_times(steps: dict[str, Callable], repeats: int, order: Callable[[int], list]) -> dict[str, list]:
    """Every step's time in each repeat, after two warm-up calls each. The steps take turns within a repeat, so that
    drifts of the machine hit all of them; `order(repeat)` says in which order."""
    for step in steps.values():
        step()
        step()
    times = {kind: [] for kind in steps}
    for repeat in range(repeats):
        for kind in order(repeat):
            times[kind].append(timed(steps[kind]))
    return times


def time_ratio(size: str, pixels: int, batch: int, mode: str, repeats: int, attention: str = "auto") -> dict:
    steps = {
        kind: make_step(build(kind, size, attention=attention), pixels, batch, mode) for kind in ("locatvit", "vit")
    }
    times = interleaved_times(steps, repeats, lambda repeat: list(steps)[:: 1 if repeat % 2 == 0 else -1])
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    paired = [locatvit / vit for locatvit, vit in zip(times["locatvit"], times["vit"])]
    return {
        "locatvit_s": medians["locatvit"],
        "vit_s": medians["vit"],
        "ratio": medians["locatvit"] / medians["vit"],
        "ratio_range": [min(paired), max(paired)],
        "locatvit_times_s": times["locatvit"],
        "vit_times_s": times["vit"],
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MallocInfo(ctypes.Structure):
    """glibc's `struct mallinfo2`."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def malloc_in_use() -> Callable[[], int] | None:
    """A function giving the bytes glibc's malloc has handed out and not taken back (heap chunks in use plus mapped
    blocks): the CPU counterpart of `torch.cuda.memory_allocated`. None where glibc (>= 2.33) is not the allocator."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallocInfo

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


def memory_child(kind: str, gradient_checkpointing: bool, case: tuple) -> dict:
    """Extra memory of one training step of `kind`, measured in this (fresh) process: `peak` (on CPU the resident
    set, on CUDA the allocation) and, on CPU with glibc, `allocated` (malloc's bytes in use)."""
    size, pixels, batch, attention = case
    model = build(kind, size, gradient_checkpointing, attention)
    with torch.no_grad():  # loads the kernels, so that their one-off allocations are not counted
        model.eval()(torch.randn(1, 3, pixels, pixels, device=DEVICE), interpolate_pos_encoding=True)
    step = make_step(model, pixels, batch, "training")
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {"peak": torch.cuda.max_memory_allocated() - before}
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    in_use = malloc_in_use()
    before = rss_bytes(), in_use() if in_use else 0
    peak = list(before)
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            if in_use:
                peak[1] = max(peak[1], in_use())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    step()
    done.set()
    sampler.join()
    result = {"peak": max(peak[0], rss_bytes()) - before[0]}
    if in_use:
        result["allocated"] = peak[1] - before[1]
    return result


def memory_ratio(gradient_checkpointing: bool, runs: int, case: tuple) -> dict:
    """Median over `runs` fresh subprocesses per model: on CPU the peak RSS of one step varies by tens of MB with
    where the allocator happens to place and release large blocks (glibc's heap holds several times the bytes in
    use at the peak), which is why the bytes malloc has handed out are reported too (`allocated`: the same in every
    run)."""
    result = {}
    for kind in ("locatvit", "vit"):
        size, pixels, batch, attention = case
        command = [sys.executable, __file__, "--memory-child", kind, "--case", f"{size},{pixels},{batch},{attention}"]
        if gradient_checkpointing:
            command.append("--gradient-checkpointing")
        runs_measured = []
        for _ in range(runs):
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs_measured.append(json.loads(output.strip().splitlines()[-1]))
        for measure, suffix in (("peak", "_mb"), ("allocated", "_allocated_mb")):
            if measure in runs_measured[0]:
                result[kind + suffix] = statistics.median(run[measure] for run in runs_measured) / 2**20
    result["ratio"] = result["locatvit_mb"] / result["vit_mb"]
    if "locatvit_allocated_mb" in result:
        result["allocated_ratio"] = result["locatvit_allocated_mb"] / result["vit_allocated_mb"]
    return result


def save(path: str, machine: str, rows: list) -> None:
    """Written after every row, so that a run cut short keeps what it measured."""
    with open(path, "w") as file:
        json.dump({"machine": machine, "torch": torch.__version__, "results": rows}, file, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default="benchmarks/results.json")
    parser.add_argument("--quick", action="store_true", help="tiny cases only, 3 repeats (a smoke run)")
    parser.add_argument("--high-res", action="store_true", help="add 1024/2048 px inference, 1024 px training")
    parser.add_argument("--backend", default="auto", help="LocAtViT's attention backend (default: chosen per call)")
    parser.add_argument("--only", help="measure only the rows whose label matches this regular expression")
    parser.add_argument("--memory-child", choices=["locatvit", "vit"], help=argparse.SUPPRESS)
    parser.add_argument("--case", default=",".join(map(str, MEMORY_CASES[0])), help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.memory_child:
        size, pixels, batch, attention = args.case.split(",")
        case = (size, int(pixels), int(batch), attention)
        print(json.dumps(memory_child(args.memory_child, args.gradient_checkpointing, case)))
        return

    cases = [case for case in (CUDA_CASES if DEVICE == "cuda" else CASES) if not args.quick or case[1] == "tiny"]
    memory_cases = list(CUDA_MEMORY_CASES if DEVICE == "cuda" else MEMORY_CASES)
    if args.high_res:
        extra_cases, extra_memory = high_res_cases()
        cases += extra_cases
        memory_cases += extra_memory
    cases = [(*case[:-1], args.backend) for case in cases]
    memory_cases = [(*case[:-1], args.backend) for case in memory_cases]
    repeats = 3 if args.quick else args.repeats
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {DEVICE}"
    tuned = [f"{name}={value}" for name, value in sorted(os.environ.items()) if name.startswith("MALLOC_")]
    if tuned:  # glibc's allocator settings change how often large CPU tensors cost page faults
        machine += ", " + " ".join(tuned)
    if args.backend == "auto":  # what the automatic choice runs for a float32 forward on this device
        query = torch.zeros(1, 1, 2, 64, device=DEVICE)
        chosen = select_backend(query, (query, query), implementation="sdpa", forced=None, dropout=0.0)
        machine += f", attention backend auto ({chosen} in float32 inference)"
    else:
        machine += f", attention backend {args.backend}"
    if DEVICE == "cuda":
        machine = f"{torch.cuda.get_device_name()}, cuda"
    rows = []
    print(f"LocAtViT / ViT (transformers), sdpa, torch {torch.__version__}, {machine}")
    print(f"{'measure':<34} {'LocAtViT':>10} {'ViT':>10} {'ratio':>7}  {'per repeat':>11}")
    for name, size, pixels, batch, mode, attention in cases:
        label = f"{name}, {size}, {pixels} px, batch {batch}" + ("" if attention == "auto" else f", {attention}")
        if args.only and not re.search(args.only, label):
            continue
        result = time_ratio(size, pixels, batch, mode, repeats, attention)
        rows.append({"measure": label, **result})
        save(args.json, machine, rows)
        low, high = result["ratio_range"]
        print(
            f"{label:<34} {result['locatvit_s'] * 1e3:>8.1f}ms {result['vit_s'] * 1e3:>8.1f}ms {result['ratio']:>6.2f}x"
            f"  {low:.2f}-{high:.2f}x"
        )
    # CUDA's allocator statistics are the same in every run; on CPU the resident set varies (`memory_ratio`).
    memory_runs = 1 if args.quick or DEVICE == "cuda" else 5
    for case in memory_cases:
        size, pixels, batch, attention = case
        for checkpointing in (True, False):
            label = f"train memory, {size}, {pixels} px, b{batch}" + ("" if attention == "auto" else f", {attention}")
            label += ", ckpt" if checkpointing else ""
            if args.only and not re.search(args.only, label):
                continue
            result = memory_ratio(checkpointing, memory_runs, case)
            rows.append({"measure": label, **result})
            save(args.json, machine, rows)
            print(f"{label:<34} {result['locatvit_mb']:>8.0f}MB {result['vit_mb']:>8.0f}MB {result['ratio']:>6.2f}x")
            if "allocated_ratio" in result:
                print(
                    f"{'  malloc in use (same step)':<34} {result['locatvit_allocated_mb']:>8.0f}MB "
                    f"{result['vit_allocated_mb']:>8.0f}MB {result['allocated_ratio']:>6.2f}x"
                )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
