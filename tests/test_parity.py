"""The converted parity checkpoint reproduces the original implementation's outputs (SPEC §8)."""

import pytest
import torch
from safetensors.torch import load_file

from locatvit_hf.convert import load_converted

CASES = {"cls224": False, "up384": True, "rect256x320": True}  # case -> needs interpolate_pos_encoding


@pytest.fixture(scope="module")
def expected(parity_dir):
    return load_file(str(parity_dir / "expected.safetensors"))


@pytest.fixture(scope="module")
def model(parity_dir):
    return load_converted(str(parity_dir))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_logits_and_features_match_original(model, expected, case):
    pixel_values = expected[f"{case}.pixel_values"]
    with torch.no_grad():
        outputs = model(pixel_values, interpolate_pos_encoding=CASES[case], output_hidden_states=True)
        refined = model.locatvit(pixel_values, interpolate_pos_encoding=CASES[case]).last_hidden_state
    assert max_abs_diff(outputs.logits, expected[f"{case}.logits"]) <= 1e-4
    assert max_abs_diff(outputs.hidden_states[-1], expected[f"{case}.last_block_output"]) <= 1e-4
    assert max_abs_diff(refined, expected[f"{case}.refined_output"]) <= 1e-4


def test_layer0_gaussian_bias_matches_original(model, expected, monkeypatch):
    """The bias as the mask path writes it (the fused CPU kernel never materializes it; the logits test covers it)."""
    import locatvit_hf.modeling_locatvit as modeling

    monkeypatch.setattr(modeling, "fused_cpu_attention", lambda: None)
    pixel_values = expected["cls224.pixel_values"][:1]
    captured = {}
    attention = model.locatvit.encoder.layers[0].attention
    hook = attention.gaussian_bias.register_forward_hook(
        lambda module, args, output: captured.update(bias=output.clone())
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


def test_gradients_match_original(model, expected):
    model.train()
    model.zero_grad()
    model(expected["cls224.pixel_values"]).logits.sum().backward()
    names = [key.removeprefix("cls224.grad.") for key in expected if key.startswith("cls224.grad.")]
    assert len(names) == 5
    for name in names:
        reference = expected[f"cls224.grad.{name}"].double()
        ours = our_gradient(model, name).double()
        relative = ((ours - reference).norm() / reference.norm()).item()
        assert relative <= 1e-3, (name, relative)
    model.eval()
