"""`attn_implementation="flex_attention"`: the Gaussian evaluated inside the kernel matches the sdpa mask path."""

import copy

import pytest
import torch

from locatvit_hf import LocAtViTForSemanticSegmentation, LocAtViTModel

from .conftest import assert_gradients_close, tiny_config


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


@pytest.fixture
def flex_with_backward_on_cpu(monkeypatch):
    """CPU flex attention refuses a backward pass (its compiled kernel has none); its eager implementation, which
    evaluates the same score modification densely, has one, the gradients of the captured per-query variances and
    strengths included. Lets the flex path train on CPU, for the tests below; on CUDA the compiled kernel runs
    (benchmarks/check_accelerator.py)."""
    import torch.nn.attention.flex_attention as flex_module

    from locatvit_hf import modeling_locatvit

    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    monkeypatch.setattr(modeling_locatvit, "compiled_flex_attention", lambda: flex_module.flex_attention)
    # The eager implementation traces itself; shapes seen by earlier tests would make that trace dynamic.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "image_size, height, width, checkpointing",
    [(32, 40, 24, False), (32, 24, 40, True), (256, 88, 72, False)],  # the last: the pooled training shortcut
)
def test_flex_training_gradients_match_sdpa(flex_with_backward_on_cpu, image_size, height, width, checkpointing):
    """Training through the flex path (the Gaussian's statistics captured by the score modification) gives the
    loss and every parameter's gradient of the sdpa path."""
    config = tiny_config(image_size=image_size, num_hidden_layers=2)
    sdpa, flex = pair(config, LocAtViTForSemanticSegmentation)
    x = torch.randn(2, 3, height, width)
    labels = torch.randint(0, 5, (2, height, width))
    losses = []
    for model in (sdpa, flex):
        if checkpointing:  # reentrant: PyTorch's eager flex attention (the stand-in here) returns wrong gradients of
            # captured tensors under non-reentrant checkpointing (torch 2.14, reproduced without this model); the
            # compiled kernel with the default checkpointing is checked on CUDA (benchmarks/check_accelerator.py).
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        loss = model.train()(x, labels=labels, interpolate_pos_encoding=True).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert_gradients_close(flex, sdpa)
