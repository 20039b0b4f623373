"""The contracts transformers' vision models keep, kept by every LocAtViT task model: distributed training without
unused parameters, any input size for dense tasks, `from_pretrained` reporting (not refusing) missing weights,
`torch.compile(fullgraph=True)` of inference and of a training step, and attention implementations that
`set_attn_implementation` switches and transformers' `AttentionInterface` extends."""

import copy
import json
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from locatvit_hf import (
    LocAtViTBackbone,
    LocAtViTForImageClassification,
    LocAtViTForSemanticSegmentation,
    LocAtViTModel,
)

from .conftest import assert_same_training_step, tiny_config

TASK_MODELS = [LocAtViTModel, LocAtViTForImageClassification, LocAtViTForSemanticSegmentation, LocAtViTBackbone]


def build(model_class, **overrides):
    return model_class(tiny_config(**overrides))


def training_loss(model, pixel_values: torch.Tensor, forward=None) -> torch.Tensor:
    """The loss a user trains each model with: its own for the task heads, a mean of the outputs otherwise.
    `forward` (default: the model) runs it, e.g. a DDP wrapper of the model."""
    forward = model if forward is None else forward
    generator = torch.Generator().manual_seed(1)
    if isinstance(model, LocAtViTForImageClassification):
        return forward(pixel_values, labels=torch.randint(0, 5, (len(pixel_values),), generator=generator)).loss
    if isinstance(model, LocAtViTForSemanticSegmentation):
        labels = torch.randint(0, 5, (len(pixel_values), *pixel_values.shape[-2:]), generator=generator)
        return forward(pixel_values, labels=labels).loss
    if isinstance(model, LocAtViTBackbone):
        return sum(feature_map.square().mean() for feature_map in forward(pixel_values).feature_maps)
    return forward(pixel_values).last_hidden_state.square().mean()


@pytest.mark.parametrize(
    "model_class, overrides",
    [(cls, {}) for cls in TASK_MODELS] + [(LocAtViTBackbone, {"out_indices": [1]})],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_every_parameter_gets_a_gradient(model_class, overrides):
    model = build(model_class, **overrides).train()
    training_loss(model, torch.randn(2, 3, 32, 32)).backward()
    without = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert not without, f"parameters outside the loss: {without}"


@pytest.mark.parametrize("model_class", TASK_MODELS, ids=lambda value: value.__name__)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_linear_layer_runs_its_forward(model_class, training):
    """Tools that rewrite `nn.Linear` layers (LoRA adapters on "all-linear", quantization) replace their forward: a
    Linear whose weight the model read without calling it would keep its adapter out of the loss (unused parameters,
    and a merged model that computes something else) or fail on its quantized weight."""
    model = build(model_class).train(training)
    called = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda module, args, output, name=name: called.add(name))
    linear = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    with torch.set_grad_enabled(training):
        training_loss(model, torch.randn(2, 3, 32, 32))
    assert linear and linear == called, f"Linear layers whose forward never ran: {sorted(linear - called)}"


@pytest.mark.parametrize("model_class", [LocAtViTForImageClassification, LocAtViTForSemanticSegmentation])
def test_dynamic_int8_quantization_of_the_linear_layers(model_class):
    """`torch.ao.quantization.quantize_dynamic(model, {nn.Linear})`, the one-line CPU quantization of a trained
    model, runs and stays close to the float model (int8 weights, activations quantized per batch)."""
    model = build(model_class).eval()
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    assert any(type(module).__module__.startswith("torch.ao") for module in quantized.modules())
    with torch.no_grad():
        expected, got = model(pixel_values).logits, quantized(pixel_values).logits
    assert got.shape == expected.shape
    similarity = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert similarity > 0.99, similarity


def ddp_worker(rank: int, world_size: int, init_file: str, model_class_name: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = {cls.__name__: cls for cls in TASK_MODELS}[model_class_name](tiny_config()).train()
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(2):
                torch.manual_seed(step * world_size + rank)  # each rank its own batch
                optimizer.zero_grad()
                training_loss(model, torch.randn(2, 3, 32, 32), ddp).backward()
                optimizer.step()
        digest = [float(parameter.detach().double().sum()) for parameter in model.parameters()]
        with open(f"{result_file}.{rank}", "w") as file:
            json.dump({"digest": digest, "warnings": [str(w.message) for w in caught]}, file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("model_class", TASK_MODELS, ids=lambda cls: cls.__name__)
def test_two_process_ddp_steps_without_unused_parameters(tmp_path, model_class):
    """Two steps of 2-process CPU DDP with `find_unused_parameters=False` (as transformers' example scripts under
    `accelerate launch`): the second step fails if a parameter got no gradient in the first; the ranks end with the
    same weights, and DDP warns of nothing (a gradient whose strides differ from its parameter's)."""
    result = tmp_path / "result"
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), model_class.__name__, str(result)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"result.{rank}").read_text()) for rank in range(2)]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    for rank in ranks:
        assert not [message for message in rank["warnings"] if "stride" in message.lower()], rank["warnings"]


@pytest.mark.parametrize("model_class", [LocAtViTForSemanticSegmentation, LocAtViTBackbone], ids=lambda c: c.__name__)
def test_dense_models_take_any_size_by_default(model_class):
    """As DINOv2: a crop of another size than the config's is taken without an argument (transformers' example
    scripts pass none), a non-square one too; the config or the call can still refuse it."""
    model = build(model_class).eval()
    with torch.no_grad():
        output = model(torch.randn(1, 3, 48, 40))
    maps = output.feature_maps if model_class is LocAtViTBackbone else (output.logits,)
    assert all(feature_map.shape[-2:] == (6, 5) for feature_map in maps)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model(torch.randn(1, 3, 48, 40), interpolate_pos_encoding=False)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        build(model_class, interpolate_pos_encoding=False)(torch.randn(1, 3, 48, 40))


@pytest.mark.parametrize("model_class", [LocAtViTModel, LocAtViTForImageClassification], ids=lambda c: c.__name__)
def test_classification_keeps_vits_size_check(model_class):
    model = build(model_class).eval()
    with pytest.raises(ValueError, match="doesn't match the model's image size"):
        model(torch.randn(1, 3, 48, 40))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 40), interpolate_pos_encoding=True) is not None
        assert build(model_class, interpolate_pos_encoding=True)(torch.randn(1, 3, 48, 40)) is not None


def test_from_pretrained_initializes_and_reports_missing_weights(tmp_path):
    """transformers' contract: weights the checkpoint lacks are initialized and listed in the load report, weights
    it holds that the model has no place for are listed too; nothing is raised."""
    shallow = build(LocAtViTForImageClassification, num_hidden_layers=1)
    shallow.save_pretrained(tmp_path / "shallow")
    deeper, info = LocAtViTForImageClassification.from_pretrained(
        tmp_path / "shallow", num_hidden_layers=2, output_loading_info=True
    )
    missing = set(info["missing_keys"])
    assert missing == {key for key in deeper.state_dict() if key.startswith("locatvit.encoder.layers.1.")}
    assert info["unexpected_keys"] == [] or not info["unexpected_keys"]
    for key, value in shallow.state_dict().items():
        assert torch.equal(deeper.state_dict()[key], value), key
    fresh = deeper.locatvit.encoder.layers[1].attention.q_proj.weight
    assert torch.isfinite(fresh).all() and fresh.std() > 0  # initialized, not left empty

    again, info = LocAtViTForImageClassification.from_pretrained(
        tmp_path / "shallow", num_hidden_layers=1, use_gaussian_attention=False, output_loading_info=True
    )
    assert info["unexpected_keys"] and all("gaussian_bias" in key for key in info["unexpected_keys"])
    assert not info["missing_keys"]


def test_saved_model_carries_no_card_code(tmp_path):
    """The model card is written by the converter and the CLIs; the saved model code stays the modeling files."""
    build(LocAtViTForImageClassification).save_pretrained(tmp_path)
    assert not (tmp_path / "modelcard_locatvit.py").exists()
    assert not (tmp_path / "README.md").exists()


@pytest.mark.parametrize("model_class", TASK_MODELS, ids=lambda cls: cls.__name__)
def test_fullgraph_compile_of_inference_and_a_training_step(model_class):
    """`torch.compile(fullgraph=True)` traces inference and a training step with labels in one graph each (no host
    sync on the labels), with the eager model's outputs and gradients."""
    torch._dynamo.reset()
    model = build(model_class)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        expected = training_loss(model, pixel_values)
        torch.testing.assert_close(training_loss(model, pixel_values, compiled), expected, rtol=1e-5, atol=1e-6)
    model.train()
    assert_compiled_step_matches_eager(model, compiled, pixel_values)


def assert_compiled_step_matches_eager(model, compiled, pixel_values: torch.Tensor) -> None:
    """A training step through `compiled` (`model` under `torch.compile`) and one through `model`: the same
    gradients."""
    model.zero_grad()
    training_loss(model, pixel_values, compiled).backward()
    compiled_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    training_loss(model, pixel_values).backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(compiled_grads[name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "model_class, overrides",
    [(LocAtViTForSemanticSegmentation, {}), (LocAtViTForImageClassification, {"interpolate_pos_encoding": True})],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_compiled_training_at_other_image_sizes(model_class, overrides):
    """A compiled model trained on images of several sizes: `torch.compile` compiles again for the second size with
    dynamic shapes (its default), position embeddings resampled in the graph, and every step's gradients are the
    eager model's."""
    torch._dynamo.reset()
    model = build(model_class, **overrides).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for height, width in [(32, 32), (48, 40), (64, 48)]:
        assert_compiled_step_matches_eager(model, compiled, torch.randn(2, 3, height, width))


def test_set_attn_implementation_switches_a_built_model():
    """`set_attn_implementation` switches between eager (which returns the attention probabilities) and sdpa on a
    model that exists, with the same outputs either way."""
    model = LocAtViTForImageClassification._from_config(tiny_config(), attn_implementation="sdpa").eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with_sdpa = model(pixel_values, output_attentions=True)
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        with_eager = model(pixel_values, output_attentions=True)
        model.set_attn_implementation("sdpa")
        again = model(pixel_values, output_attentions=True)
    assert not with_sdpa.attentions and not again.attentions
    assert len(with_eager.attentions) == model.config.num_hidden_layers
    probabilities = with_eager.attentions[0]
    assert probabilities.shape == (2, 2, 17, 17)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 2, 17))
    torch.testing.assert_close(with_eager.logits, with_sdpa.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again.logits, with_sdpa.logits)


@pytest.fixture
def recording_attention_function():
    """A function registered with transformers' `AttentionInterface` (as a Hub kernel registers itself): sdpa with
    the mask it is given, recording each mask. Unregistered afterwards."""
    name = "recording_sdpa_for_locatvit_tests"
    masks = []

    def attention(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    yield name, masks
    del AttentionInterface._global_mapping[name]


@pytest.mark.parametrize("gaussian", [True, False], ids=["gaug", "plain-vit"])
def test_registered_attention_function_gets_the_gaussian_bias_as_its_mask(recording_attention_function, gaussian):
    """A model built with `attn_implementation` naming a registered function calls it in every layer, with the
    Gaussian bias as its float mask (none for a plain ViT): the same loss and gradients as LocAtViT's own sdpa."""
    name, masks = recording_attention_function
    # Without the projections' biases: the keys' bias has a zero gradient but for rounding, which no relative
    # tolerance can compare.
    config = tiny_config(use_gaussian_attention=gaussian, qkv_bias=False)
    registered = LocAtViTForImageClassification._from_config(config, attn_implementation=name).train()
    own = LocAtViTForImageClassification._from_config(copy.deepcopy(config), attn_implementation="sdpa").train()
    own.load_state_dict(registered.state_dict())
    assert_same_training_step(registered, own, torch.randn(2, 3, 32, 32), torch.tensor([1, 3]))
    assert len(masks) == config.num_hidden_layers
    if gaussian:
        assert all(mask.shape == (2, 2, 17, 17) and mask.dtype == torch.float32 for mask in masks)
        assert masks[0][:, :, 0].abs().max() == 0 and masks[0][:, :, 1:, 1:].min() > 0  # CLS unbiased, patches biased
    else:
        assert all(mask is None for mask in masks)


def test_registered_attention_function_refuses_a_forced_backend(recording_attention_function):
    name, _ = recording_attention_function
    model = LocAtViTForImageClassification._from_config(
        tiny_config(attention_backend="eager"), attn_implementation=name
    )
    with pytest.raises(ValueError, match="attention_backend=None"):
        model(torch.randn(1, 3, 32, 32))
