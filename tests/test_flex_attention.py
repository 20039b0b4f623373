"""`attn_implementation="flex_attention"`: the Gaussian evaluated inside the kernel matches the sdpa mask path."""

import copy

import pytest
import torch

from locatvit_hf import LocAtViTForSemanticSegmentation, LocAtViTModel

from .conftest import tiny_config


def pair(config, model_class=LocAtViTModel):
    sdpa = model_class._from_config(copy.deepcopy(config), attn_implementation="sdpa")
    flex = model_class._from_config(copy.deepcopy(config), attn_implementation="flex_attention")
    flex.load_state_dict(sdpa.state_dict())
    with torch.no_grad():  # trained-like Gaussians: varied variances and strengths
        for model in (sdpa, flex):
            torch.manual_seed(1)
            for layer in model.encoder.layers if hasattr(model, "encoder") else model.locatvit.encoder.layers:
                layer.attention.gaussian_bias.variance_proj.bias.uniform_(-3, 3)
                layer.attention.gaussian_bias.strength_proj.bias.uniform_(0, 3)
    return sdpa, flex


@pytest.mark.parametrize("height, width", [(32, 32), (40, 56), (72, 24)])
def test_flex_matches_sdpa_in_inference(height, width):
    sdpa, flex = pair(tiny_config())
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        expected = sdpa.eval()(x, interpolate_pos_encoding=True).last_hidden_state
        actual = flex.eval()(x, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_flex_matches_sdpa_with_pooled_training_shortcut():
    """Initial grid 32 x 32: in training mode both paths use the pooled-query shortcut (forward only on CPU)."""
    config = tiny_config(image_size=256, patch_size=8, num_hidden_layers=1)
    sdpa, flex = pair(config, LocAtViTForSemanticSegmentation)
    x = torch.randn(1, 3, 88, 72)
    with torch.no_grad():
        expected = sdpa.train()(x, interpolate_pos_encoding=True).logits
        actual = flex.train()(x, interpolate_pos_encoding=True).logits
        evaluated = sdpa.eval()(x, interpolate_pos_encoding=True).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, evaluated, atol=1e-4)  # the shortcut really was taken


def test_flex_refuses_attention_dropout():
    config = tiny_config(attention_probs_dropout_prob=0.1)
    model = LocAtViTModel._from_config(config, attn_implementation="flex_attention").train()
    with pytest.raises(ValueError, match="attention_probs_dropout_prob=0"):
        model(torch.randn(1, 3, 32, 32))
