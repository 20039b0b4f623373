"""Converted checkpoints of the original implementation reproduce its outputs
(docs/method.md#parity-with-the-original).

Two parity sets, each a checkpoint in the original's format and the original's outputs for it:

- small (`tests/fixtures/parity-small`, carried by the repository, so these tests run in every clone): 2 blocks of
  width 48, 3 heads, 10 classes; logits and features at 224 px, at 160 px (a downscaled grid, 10x10) and at 240x288
  (an upscaled, non-square grid, 15x18), and five gradients;
- full size (`../shared/parity`, conftest's `parity_dir`, skipped when absent): LocAtViT-Tiny (12 blocks of width
  192, 1000 classes), for what only it holds: a batch of two images at 224 px (outputs and gradients), a square
  upscale to 384 px (24x24 grid) and the first layer's Gaussian bias.
"""

import pytest
import torch
from safetensors.torch import load_file

from locatvit_hf.attention_locatvit import NUM_PREFIX_TOKENS, full_bias
from locatvit_hf.convert import load_converted

from .conftest import SMALL_PARITY_DIR

# (parity set, case, interpolate_pos_encoding): interpolation is needed wherever the grid is not the checkpoint's
# 14x14.
CASES = [
    ("small", "cls224", False),
    ("small", "down160", True),
    ("small", "rect240x288", True),
    ("full", "cls224", False),
    ("full", "up384", True),
]


@pytest.fixture(scope="module")
def parity_set(request):
    """The converted model (eval mode) and the original's outputs of the parity set named by the parameter."""
    directory = SMALL_PARITY_DIR if request.param == "small" else request.getfixturevalue("parity_dir")
    return load_converted(str(directory)), load_file(str(directory / "expected.safetensors"))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def pixels(expected: dict[str, torch.Tensor], case: str) -> torch.Tensor:
    """The case's input in float32 (the small set stores it in float16, which float32 holds exactly)."""
    return expected[f"{case}.pixel_values"].float()


@pytest.mark.parametrize(
    "parity_set, case, interpolate",
    [pytest.param(*params, id=f"{params[0]}-{params[1]}") for params in CASES],
    indirect=["parity_set"],
)
def test_logits_and_features_match_original(parity_set, case, interpolate):
    model, expected = parity_set
    pixel_values = pixels(expected, case)
    with torch.no_grad():
        outputs = model(pixel_values, interpolate_pos_encoding=interpolate, output_hidden_states=True)
        refined = model.locatvit(pixel_values, interpolate_pos_encoding=interpolate).last_hidden_state
    assert max_abs_diff(outputs.logits, expected[f"{case}.logits"]) <= 1e-4
    assert max_abs_diff(outputs.hidden_states[-1], expected[f"{case}.last_block_output"]) <= 1e-4
    assert max_abs_diff(refined, expected[f"{case}.refined_output"]) <= 1e-4


@pytest.mark.parametrize("parity_set", ["full"], indirect=True)
def test_layer0_gaussian_bias_matches_original(parity_set):
    """The bias written out from the profiles that the Gaussian module returns, whichever backend attends."""
    model, expected = parity_set
    pixel_values = pixels(expected, "cls224")[:1]
    captured = {}
    attention = model.locatvit.encoder.layers[0].attention
    hook = attention.gaussian_bias.register_forward_hook(
        lambda module, args, output: captured.update(bias=full_bias(*output, NUM_PREFIX_TOKENS))
    )
    try:
        with torch.no_grad():
            model(pixel_values)
    finally:
        hook.remove()
    assert max_abs_diff(captured["bias"], expected["cls224.layer0_gaussian_bias"]) <= 1e-5


def our_gradient(model, timm_name: str) -> torch.Tensor:
    """The gradient of a timm parameter, assembled from ours (qkv is split into q, k, v)."""
    parameters = dict(model.named_parameters())
    name = timm_name.replace("patch_embed.proj", "locatvit.embeddings.patch_embeddings.projection")
    name = name.replace("blocks.", "locatvit.encoder.layers.")
    name = name.replace("attn.gaug.log_var", "attention.gaussian_bias.variance_proj")
    name = name.replace("attn.gaug.log_alpha", "attention.gaussian_bias.strength_proj")
    if ".attn.qkv." in name:
        parts = [parameters[name.replace("attn.qkv", f"attention.{p}_proj")].grad for p in "qkv"]
        return torch.cat(parts, dim=0)
    return parameters[name].grad


@pytest.mark.parametrize("parity_set", ["small", "full"], indirect=True)
def test_gradients_match_original(parity_set):
    """Gradients of logits.sum() over the 224 px case in training mode, for the five parameters the set holds."""
    model, expected = parity_set
    names = [key.removeprefix("cls224.grad.") for key in expected if key.startswith("cls224.grad.")]
    assert len(names) == 5
    model.train()
    model.zero_grad()
    try:
        model(pixels(expected, "cls224")).logits.sum().backward()
        for name in names:
            reference = expected[f"cls224.grad.{name}"].double()
            ours = our_gradient(model, name).double()
            relative = ((ours - reference).norm() / reference.norm()).item()
            assert relative <= 1e-3, (name, relative)
    finally:
        model.zero_grad()
        model.eval()
