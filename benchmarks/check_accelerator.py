"""Every attention backend on the accelerator against a float64 CPU reference: outputs and all parameter gradients.

    python benchmarks/check_accelerator.py [--json benchmarks/accelerator_checks.json] [--only REGEX]

CI has no GPU, so the CUDA paths are checked here, on a lent GPU: the automatic choice, every registered backend
that runs on the device (`attention_locatvit.BACKENDS`, forced with `attention_backend`), sdpa's mask with only the
efficient or only the math kernel, and training under gradient checkpointing. The reference is the eager backend in
float64 on CPU with the same weights;
each check reports ||out - ref|| / ||ref|| for the logits and the largest such error over the parameter
gradients. Float32 without TF32: within 1e-4; bf16 autocast: logits within 3e-2, gradients within twice the
eager path's error under the same autocast (at least 3e-2). Runs on CPU too (the CPU backends). Exits non-zero
when a check fails.
"""

import argparse
import contextlib
import copy
import json
import re
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from locatvit_hf import LocAtViTConfig, LocAtViTForImageClassification
from locatvit_hf.attention_locatvit import BACKENDS, backend_unavailable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOAT32_TOLERANCE = 1e-4
BF16_TOLERANCE = 3e-2


def config_for(image_size: int) -> LocAtViTConfig:
    """ViT-Tiny's width and heads (head_dim 64), two layers."""
    return LocAtViTConfig.from_preset("tiny", num_hidden_layers=2, image_size=image_size, num_labels=10)


def randomized(model):
    """Trained-like Gaussians: variances and strengths far from their initial 1 and ln 2."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.locatvit.encoder.layers:
            bias = layer.attention.gaussian_bias
            bias.variance_proj.bias.copy_(torch.empty(2).uniform_(-3, 3, generator=generator))
            bias.strength_proj.bias.copy_(torch.empty(1).uniform_(0, 3, generator=generator))
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return float("nan")
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def run(model, pixels, labels, training: bool):
    """Logits and (in training) the parameter gradients of one forward (+ backward)."""
    model.train(training)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(training):
        output = model(pixels, labels=labels, interpolate_pos_encoding=True)
    if not training:
        return output.logits, {}
    output.loss.backward()
    return output.logits, {
        name: p.grad for name, p in model.named_parameters() if p.grad is not None and not is_key_bias(name)
    }


def is_key_bias(name: str) -> bool:
    """The key projection's bias adds q . b_k to all logits of a query alike, which softmax ignores: its gradient is
    zero up to rounding, and a relative error of rounding noise says nothing."""
    return name.endswith("k_proj.bias")


def check(name, reference, model, pixels, labels, training, tolerance, context=contextlib.nullcontext):
    expected_logits, expected_grads = reference
    with context():
        logits, grads = run(model, pixels.to(DEVICE), labels.to(DEVICE), training)
    errors = {"logits": relative_error(logits, expected_logits)}
    if training:
        missing = sorted(set(expected_grads) - set(grads))
        if missing:
            raise AssertionError(f"{name}: no gradient for {missing}")
        worst = max(expected_grads, key=lambda n: relative_error(grads[n], expected_grads[n]))
        errors["gradients"] = relative_error(grads[worst], expected_grads[worst])
        errors["worst parameter"] = worst
    passed = all(v <= tolerance for k, v in errors.items() if k != "worst parameter")  # NaN fails
    return {"check": name, "passed": passed, "tolerance": tolerance, **errors}


def bf16_autocast():
    return torch.autocast(DEVICE, dtype=torch.bfloat16)


def efficient_kernel_only():
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])


def math_kernel_only():
    return sdpa_kernel([SDPBackend.MATH])


def check_path(name, base, backend, reference, pixels, labels, training, tolerance, context, checkpointing):
    """`check` of a copy of `base` on the device with attention `backend` forced (None: the automatic choice); a
    path that fails to run is a failed check, with the reason."""
    model = copy.deepcopy(base).to(DEVICE)
    model.config.attention_backend = backend
    if checkpointing:
        model.activation_checkpointing_enable()
    try:
        return check(name, reference, model, pixels, labels, training, tolerance, context)
    except Exception as error:
        return {"check": name, "passed": False, "error": f"{type(error).__name__}: {error}"[:400]}


def runnable_backends(training: bool) -> list[str]:
    """The registered backends that can run a float32 call of `config_for`'s shape on the device (natively: not the
    Triton kernel under its CPU interpreter, which the tests cover on small shapes)."""
    query = torch.zeros(1, 3, 2, 64, device=DEVICE, requires_grad=training)
    profiles = (query, query)
    native = [name for name in sorted(BACKENDS) if DEVICE == "cuda" or name != "cuda_triton"]
    return [name for name in native if backend_unavailable(name, query, profiles, 0.0) is None]


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


def save(path: str, results: list) -> None:
    """Written after every check, so that a run cut short keeps what it found."""
    with open(path, "w") as file:
        json.dump({"device": device_name(), "torch": torch.__version__, "checks": results}, file, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="benchmarks/accelerator_checks.json")
    parser.add_argument("--only", help="run only the checks whose name matches this regular expression")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # (what, configured image size, input height, width): a square grid at the configured size, a non-square one at
    # another size (variance rescaling, distance clamp), and the pooled-query training shortcut (initial grid 32).
    cases = [("12x9", 224, 192, 144), ("pooled 12x10", 512, 192, 160), ("14x14", 224, 224, 224)]
    results = []

    def record(result: dict) -> None:
        results.append(result)
        save(args.json, results)
        print(json.dumps(result), flush=True)

    for case, image_size, height, width in cases:
        torch.manual_seed(0)
        base = randomized(LocAtViTForImageClassification._from_config(config_for(image_size)))
        pixels, labels = torch.randn(2, 3, height, width), torch.randint(0, 10, (2,))
        reference_model = copy.deepcopy(base).double()
        reference_model.config.attention_backend = "eager"
        for training in (False, True):
            reference = run(reference_model, pixels.double(), labels, training)
            mode = "train" if training else "infer"
            paths = [("auto", None, contextlib.nullcontext)] + [
                (backend, backend, contextlib.nullcontext) for backend in runnable_backends(training)
            ]
            if DEVICE == "cuda":  # sdpa's mask with each of CUDA's kernels, sdpa's own mask gradient in training
                paths.append(("sdpa, efficient kernel only", "sdpa", efficient_kernel_only))
                paths.append(("sdpa, math kernel only", "sdpa", math_kernel_only))
            if training:  # gradient checkpointing as users enable it (non-reentrant): layers recomputed in backward
                paths.append(("auto, checkpointing", None, contextlib.nullcontext))
            for label, backend, context in paths:
                name = f"{case}, {mode}, {label}"
                if not args.only or re.search(args.only, name):
                    checkpointing = label.endswith("checkpointing")
                    record(check_path(name, base, backend, reference, pixels, labels, training,
                                      FLOAT32_TOLERANCE, context, checkpointing))  # fmt: skip
            if DEVICE == "cuda" and training:
                # bf16 rounds the (N x N) sums behind the Gaussian's parameter gradients: the eager path (the formula
                # written out, under the same autocast) sets the bar, with a floor of BF16_TOLERANCE.
                tolerance = BF16_TOLERANCE
                for backend in ["eager", None, *(b for b in runnable_backends(True) if b != "eager")]:
                    name = f"{case}, {mode}, {backend or 'auto'}, bf16 autocast"
                    if args.only and not re.search(args.only, name):
                        continue
                    result = check_path(name, base, backend, reference, pixels, labels, True, tolerance,
                                        bf16_autocast, False)  # fmt: skip
                    if backend == "eager" and "gradients" in result:
                        tolerance = max(BF16_TOLERANCE, 2 * result["gradients"])
                        result["passed"] = result["logits"] <= BF16_TOLERANCE  # the bar itself
                    record(result)
    print(f"\n{'check':<52} {'logits':>9} {'grads':>9}  result ({device_name()}, torch {torch.__version__})")
    for result in results:
        logits = f"{result['logits']:.1e}" if "logits" in result else "-"
        grads = f"{result['gradients']:.1e}" if "gradients" in result else "-"
        verdict = "ok" if result["passed"] else "FAIL " + result.get("error", "")[:80]
        print(f"{result['check']:<52} {logits:>9} {grads:>9}  {verdict}")
    sys.exit(0 if all(result["passed"] for result in results) else 1)


if __name__ == "__main__":
    main()
