"""HF-style model tests: shapes, outputs, round trips, attention backends, training, resolutions, Auto classes."""

import copy
import math

import pytest
import torch
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from locatvit_hf import (
    LocAtViTBackbone,
    LocAtViTConfig,
    LocAtViTForImageClassification,
    LocAtViTForSemanticSegmentation,
    LocAtViTModel,
)
from locatvit_hf.modeling_locatvit import LocAtViTStatisticsMap, tokens_to_feature_map

from .conftest import ALL_CLASSES, tiny_config


def pixels(batch=2, height=32, width=32):
    return torch.randn(batch, 3, height, width)


def main_output(outputs) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        if getattr(outputs, name, None) is not None:
            return getattr(outputs, name)
    return outputs.feature_maps[-1]


@pytest.mark.parametrize("model_class", ALL_CLASSES)
def test_output_shapes(model_class):
    config = tiny_config()
    model = model_class(config).eval()
    with torch.no_grad():
        outputs = model(pixels(), output_hidden_states=True)
    assert len(outputs.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (2, 17, 32) for h in outputs.hidden_states)
    if model_class is LocAtViTModel:
        assert outputs.last_hidden_state.shape == (2, 17, 32)
        torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state[:, 0])
    elif model_class is LocAtViTForImageClassification:
        assert outputs.logits.shape == (2, 5)
    elif model_class is LocAtViTForSemanticSegmentation:
        assert outputs.logits.shape == (2, 5, 4, 4)
    else:
        assert [f.shape for f in outputs.feature_maps] == [(2, 32, 4, 4)]


def test_last_hidden_state_is_refined_normed_last_block():
    model = LocAtViTModel(tiny_config()).eval()
    with torch.no_grad():
        outputs = model(pixels(), output_hidden_states=True)
        normed = model.layernorm(outputs.hidden_states[-1])
        heads = normed.view(2, 17, 2, 16).transpose(1, 2)
        weights = torch.softmax(heads @ heads.transpose(-1, -2) / math.sqrt(16), dim=-1)
        refined = (weights @ heads).transpose(1, 2).reshape(2, 17, 32)
    torch.testing.assert_close(outputs.last_hidden_state, refined)

    plain = LocAtViTModel(tiny_config(use_patch_refinement=False)).eval()
    with torch.no_grad():
        outputs = plain(pixels(), output_hidden_states=True)
    torch.testing.assert_close(outputs.last_hidden_state, plain.layernorm(outputs.hidden_states[-1]))


def test_classifier_refines_only_the_class_token():
    """The classifier's PRR refines the CLS token alone (`LocAtViTModel.pool`): the same logits and gradients as
    the classifier on the base model's `pooler_output` (PRR of every token, then its CLS row); outputs as tuples."""
    model = LocAtViTForImageClassification(tiny_config()).train()
    x = pixels()
    logits = model(x).logits
    reference = model.classifier(model.locatvit(x).pooler_output)
    torch.testing.assert_close(logits, reference)
    weights = torch.randn_like(logits)
    grads = [torch.autograd.grad((out * weights).sum(), list(model.parameters())) for out in (logits, reference)]
    for actual, expected in zip(*grads):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    as_tuple = model.eval()(x, labels=torch.tensor([0, 1]), output_hidden_states=True, return_dict=False)
    assert as_tuple[0].ndim == 0 and as_tuple[1].shape == (2, 5) and len(as_tuple[2]) == 3


def test_attentions_with_eager():
    config = tiny_config()
    model = LocAtViTForImageClassification._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        outputs = model(pixels(), output_attentions=True)
    assert len(outputs.attentions) == config.num_hidden_layers
    for attention in outputs.attentions:
        assert attention.shape == (2, 2, 17, 17)
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, 2, 17))


@pytest.mark.parametrize("model_class", ALL_CLASSES)
@pytest.mark.parametrize("use_gaussian_attention", [True, False])
def test_eager_equals_sdpa(model_class, use_gaussian_attention):
    config = tiny_config(use_gaussian_attention=use_gaussian_attention)
    eager = model_class._from_config(config, attn_implementation="eager").eval()
    sdpa = model_class._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    x = pixels(height=40, width=56)
    with torch.no_grad():
        a = main_output(eager(x, interpolate_pos_encoding=True))
        b = main_output(sdpa(x, interpolate_pos_encoding=True))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gaussian_bias_changes_attention():
    """The bias is really applied: zeroing its strength changes the output."""
    model = LocAtViTModel(tiny_config()).eval()
    x = pixels()
    with torch.no_grad():
        before = model(x).last_hidden_state
        for layer in model.encoder.layers:
            layer.attention.gaussian_bias.strength_proj.bias.fill_(-50.0)  # softplus -> ~0
        after = model(x).last_hidden_state
    assert not torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("model_class", ALL_CLASSES)
def test_save_load_round_trip(model_class, tmp_path):
    model = model_class(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    assert {"configuration_locatvit.py", "modeling_locatvit.py"} <= {p.name for p in tmp_path.iterdir()}
    loaded = model_class.from_pretrained(tmp_path).eval()
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(x)), main_output(loaded(x)), rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


@pytest.mark.parametrize(
    "enable",
    [
        lambda model: model.activation_checkpointing_enable(),
        lambda model: model.activation_checkpointing_enable(every_n_layers=2),
        lambda model: model.activation_checkpointing_enable(offload=True),
        lambda model: model.gradient_checkpointing_enable(),  # the deprecated name, still what many scripts call
    ],
    ids=["every layer", "every 2nd layer", "offload", "deprecated name"],
)
def test_gradient_checkpointing_gives_equal_gradients(enable):
    config = tiny_config(num_hidden_layers=3)
    model = LocAtViTForImageClassification(config).train()
    x, labels = pixels(), torch.tensor([1, 3])

    def gradients():
        model.zero_grad()
        model(x, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    enable(model)
    assert model.is_activation_checkpointing
    checkpointed = gradients()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_training_decreases_loss(task):
    config = tiny_config()
    if task == "classification":
        model = LocAtViTForImageClassification(config)
        labels = torch.tensor([0, 1, 2, 3])
    else:
        model = LocAtViTForSemanticSegmentation(config)
        # One class per patch (learnable at 1/8 resolution), some pixels ignored.
        labels = torch.randint(0, 5, (4, 4, 4)).repeat_interleave(8, 1).repeat_interleave(8, 2)
        labels[:, :4] = 255
    x = pixels(batch=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(30):  # the segmentation head starts small (trunc-normal 0.02), so give it a few more steps
        loss = model(x, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_segmentation_loss_upsamples_and_ignores():
    config = tiny_config()
    model = LocAtViTForSemanticSegmentation(config).eval()
    x = pixels(batch=1)
    labels = torch.randint(0, 5, (1, 32, 32))
    with torch.no_grad():
        outputs = model(x, labels=labels)
        upsampled = torch.nn.functional.interpolate(outputs.logits, size=(32, 32), mode="bilinear")
        expected = torch.nn.functional.cross_entropy(upsampled, labels)
        ignored = labels.clone()
        ignored[:, :16] = 255
        partial = model(x, labels=ignored).loss
        expected_partial = torch.nn.functional.cross_entropy(upsampled[:, :, 16:], labels[:, 16:])
    torch.testing.assert_close(outputs.loss, expected)
    torch.testing.assert_close(partial, expected_partial)


def test_frozen_backbone_stays_fixed_and_in_eval_mode():
    config = tiny_config(freeze_backbone=True, hidden_dropout_prob=0.5)
    model = LocAtViTForSemanticSegmentation(config).train()
    assert model.decode_head.training and not model.locatvit.training
    assert not any(p.requires_grad for p in model.locatvit.parameters())
    before = {k: v.clone() for k, v in model.locatvit.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, labels = pixels(), torch.randint(0, 5, (2, 32, 32))
    for _ in range(3):
        loss = model(x, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(v, model.locatvit.state_dict()[k]) for k, v in before.items())
    model.set_backbone_frozen(False)
    assert model.train().locatvit.training and all(p.requires_grad for p in model.locatvit.parameters())


@pytest.mark.parametrize("problem_type", ["single_label_classification", "multi_label_classification", "regression"])
def test_classification_problem_types(problem_type):
    config = tiny_config(num_labels=3, problem_type=problem_type)
    model = LocAtViTForImageClassification(config)
    x = pixels()
    if problem_type == "single_label_classification":
        labels = torch.tensor([0, 2])
    else:
        labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    outputs = model(x, labels=labels)
    logits = outputs.logits
    expected = {
        "single_label_classification": lambda: torch.nn.functional.cross_entropy(logits, labels),
        "multi_label_classification": lambda: torch.nn.functional.binary_cross_entropy_with_logits(logits, labels),
        "regression": lambda: torch.nn.functional.mse_loss(logits, labels),
    }[problem_type]()
    torch.testing.assert_close(outputs.loss, expected)


def test_interpolation_and_non_square_inputs():
    model = LocAtViTForSemanticSegmentation(tiny_config()).eval()
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model(pixels(height=48, width=40), interpolate_pos_encoding=False)
    with torch.no_grad():
        same = model(pixels(height=32, width=32), interpolate_pos_encoding=True).logits
        assert model(pixels(height=48, width=40), interpolate_pos_encoding=True).logits.shape == (2, 5, 6, 5)
    assert same.shape == (2, 5, 4, 4)
    # At the configured size the flag changes nothing.
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, model(x, interpolate_pos_encoding=True).logits)


@pytest.mark.parametrize("image_size", [32, (32, 48)])
@pytest.mark.parametrize("grid", [(2, 3), (1, 5), (7, 1), (9, 11)])
def test_position_embeddings_resampled_bicubic_with_antialias(image_size, grid):
    """Down and up, to sides of one patch, from square and non-square grids: `F.interpolate` of the 2-D grid."""
    model = LocAtViTModel(tiny_config(image_size=image_size)).eval()
    embeddings = model.embeddings
    resampled = embeddings.interpolate_pos_encoding(grid)
    patch = embeddings.position_embeddings[:, 1:].reshape(1, *embeddings.grid_size, 32).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(patch, size=grid, mode="bicubic", antialias=True)
    torch.testing.assert_close(resampled[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], 32))
    torch.testing.assert_close(resampled[:, :1], embeddings.position_embeddings[:, :1])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # resampled in float32 under mixed precision too
        torch.testing.assert_close(embeddings.interpolate_pos_encoding(grid), resampled)


def test_sides_not_multiple_of_patch_are_zero_padded():
    model = LocAtViTModel(tiny_config()).eval()
    x = pixels(height=37, width=30)  # -> 40 x 32, grid 5 x 4
    padded = torch.nn.functional.pad(x, (0, 2, 0, 3))
    with torch.no_grad():
        a = model(x, interpolate_pos_encoding=True, output_hidden_states=True)
        b = model(padded, interpolate_pos_encoding=True)
    assert a.hidden_states[0].shape == (2, 1 + 20, 32)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state)


def test_initialization_follows_timm():
    config = tiny_config(hidden_size=64, intermediate_size=128, image_size=64)
    model = LocAtViTForImageClassification(config)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert 0.015 < module.weight.std() < 0.025, name  # timm's trunc_normal_(std=0.02), cut at +-2
            assert module.weight.abs().max() < 0.2, name
            assert torch.all(module.bias == 0), name
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
    # The Gaussian's statistics maps (a few dozen weights each) start like the Linear layers: checked together.
    maps = [module for module in model.modules() if isinstance(module, LocAtViTStatisticsMap)]
    assert len(maps) == 2 * config.num_hidden_layers
    weights = torch.cat([module.weight.flatten() for module in maps])
    assert 0.015 < weights.std() < 0.025 and weights.abs().max() < 0.2
    assert all(torch.all(module.bias == 0) for module in maps)
    embeddings = model.locatvit.embeddings
    assert embeddings.cls_token.abs().max() < 1e-4
    assert 0.015 < embeddings.position_embeddings.std() < 0.025
    conv = embeddings.patch_embeddings.projection
    bound = 1 / math.sqrt(conv.weight[0].numel())  # PyTorch's default kaiming-uniform(a=sqrt(5)) bound
    assert conv.weight.abs().max() <= bound and conv.weight.std() > bound / 3
    # var = 1 and alpha = ln 2 at zero input: biases are zero after init.
    gaussian = model.locatvit.encoder.layers[0].attention.gaussian_bias
    variance, strength = gaussian.variance_and_strength(torch.zeros(1, 1, 1, config.head_dim), config.grid_size)
    torch.testing.assert_close(variance, torch.ones_like(variance))
    torch.testing.assert_close(strength, torch.full_like(strength, math.log(2)))


def test_plain_vit_baseline_has_same_layout_minus_gaug():
    full = LocAtViTForImageClassification(tiny_config())
    plain = LocAtViTForImageClassification(tiny_config(use_gaussian_attention=False, use_patch_refinement=False))
    full_keys = {k for k in full.state_dict() if "gaussian_bias" not in k}
    assert full_keys == set(plain.state_dict())
    params = sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in plain.parameters())
    assert params == 2 * (16 * 3 + 3)  # two layers of W_var (2x16 + 2) and W_alpha (16 + 1)


def test_preset_sizes_match_spec():
    expected = {"tiny": (192, 3, 768), "small": (384, 6, 1536), "base": (768, 12, 3072)}
    for name, (hidden, heads, mlp) in expected.items():
        config = LocAtViTConfig.from_preset(name)
        assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (hidden, heads, mlp)
        assert config.num_hidden_layers == 12 and config.head_dim == 64 and config.grid_size == (14, 14)
    with torch.device("meta"):
        model = LocAtViTForImageClassification(LocAtViTConfig.from_preset("tiny", num_labels=1000))
    assert sum(p.numel() for p in model.parameters()) == 5_719_756
    with pytest.raises(ValueError, match="preset"):
        LocAtViTConfig.from_preset("huge")


def test_auto_classes():
    kwargs = tiny_config().to_diff_dict()
    kwargs.pop("model_type")
    config = AutoConfig.for_model("locatvit", **kwargs)
    assert isinstance(config, LocAtViTConfig)
    assert type(AutoModel.from_config(config)) is LocAtViTModel
    assert type(AutoModelForImageClassification.from_config(config)) is LocAtViTForImageClassification
    assert type(AutoModelForSemanticSegmentation.from_config(config)) is LocAtViTForSemanticSegmentation
    assert type(AutoBackbone.from_config(config)) is LocAtViTBackbone


def test_auto_classes_from_saved_directory(tmp_path):
    LocAtViTForSemanticSegmentation(tiny_config()).save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is LocAtViTConfig
    for auto, expected in [
        (AutoModel, LocAtViTModel),
        (AutoModelForImageClassification, LocAtViTForImageClassification),
        (AutoModelForSemanticSegmentation, LocAtViTForSemanticSegmentation),
    ]:
        assert type(auto.from_pretrained(tmp_path)) is expected
    # transformers 5.24's AutoBackbone.from_pretrained asks the Hub whether a local folder is a repo (it fails for
    # every model type), so a saved folder goes through its config.
    backbone = AutoBackbone.from_config(AutoConfig.from_pretrained(tmp_path))
    assert type(backbone) is LocAtViTBackbone
    assert type(LocAtViTBackbone.from_pretrained(tmp_path)) is LocAtViTBackbone


def test_backbone_out_indices_and_upernet():
    config = tiny_config(num_hidden_layers=3, out_indices=[0, 2, 3])
    backbone = LocAtViTBackbone(config).eval()
    assert backbone.out_features == ["stem", "stage2", "stage3"]
    assert backbone.channels == [32, 32, 32]
    x = pixels()
    with torch.no_grad():
        outputs = backbone(x, output_hidden_states=True)
    assert len(outputs.feature_maps) == 3
    for feature_map, hidden in zip(outputs.feature_maps, [outputs.hidden_states[i] for i in (0, 2, 3)]):
        torch.testing.assert_close(feature_map, hidden[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4))
    upernet_config = UperNetConfig(
        backbone_config=tiny_config(num_hidden_layers=4, out_indices=[1, 2, 3, 4]).to_dict(),
        hidden_size=16,
        auxiliary_in_channels=32,
        num_labels=7,
    )
    upernet = UperNetForSemanticSegmentation(upernet_config).eval()
    assert isinstance(upernet.backbone, LocAtViTBackbone)
    with torch.no_grad():
        logits = upernet(pixels(batch=1)).logits
    assert logits.shape == (1, 7, 32, 32)


def test_backbone_token_outputs_drive_depth_anything(tmp_path):
    """`reshape_hidden_states=False` returns the stages' token sequences, class token first, as DINOv2's backbone does:
    the form Depth Anything's neck reads. Depth Anything then runs on a LocAtViT backbone at any multiple of the patch
    size, gradients reach every backbone parameter, and the composite model saves and loads."""
    config = tiny_config(num_hidden_layers=3, out_indices=[0, 2, 3], reshape_hidden_states=False)
    backbone = LocAtViTBackbone(config).eval()
    with torch.no_grad():
        outputs = backbone(pixels(), output_hidden_states=True)
    assert len(outputs.feature_maps) == 3
    for tokens, hidden in zip(outputs.feature_maps, [outputs.hidden_states[i] for i in (0, 2, 3)]):
        assert tokens.shape == (2, 1 + 16, 32)
        torch.testing.assert_close(tokens, hidden)

    depth_config = DepthAnythingConfig(
        backbone_config=tiny_config(num_hidden_layers=4, out_indices=[1, 2, 3, 4], reshape_hidden_states=False),
        patch_size=8,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 16, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    model = DepthAnythingForDepthEstimation(depth_config)
    assert isinstance(model.backbone, LocAtViTBackbone)
    model(pixels(height=40, width=56)).predicted_depth.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    model.eval()
    x = pixels(batch=1, height=48, width=32)
    with torch.no_grad():
        depth = model(x).predicted_depth
    assert depth.shape == (1, 48, 32)
    model.save_pretrained(tmp_path)
    reloaded = DepthAnythingForDepthEstimation.from_pretrained(tmp_path).eval()
    assert reloaded.config.backbone_config.reshape_hidden_states is False
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).predicted_depth, depth)


def test_backbone_holds_blocks_up_to_the_last_requested(tmp_path):
    """Blocks after the last returned stage would hold parameters no loss reaches: the backbone leaves them out, and
    a checkpoint of the whole encoder loads into it with those blocks reported as unused."""
    full = LocAtViTBackbone(tiny_config(num_hidden_layers=3)).eval()
    full.save_pretrained(tmp_path)
    early, info = LocAtViTBackbone.from_pretrained(tmp_path, out_indices=[1], output_loading_info=True)
    assert len(early.encoder.layers) == 1 and not info["missing_keys"]
    assert info["unexpected_keys"] and all(key.startswith("encoder.layers.") for key in info["unexpected_keys"])
    x = pixels()
    with torch.no_grad():
        hidden_states = full(x, output_hidden_states=True).hidden_states
        torch.testing.assert_close(early(x).feature_maps[0], tokens_to_feature_map(hidden_states[1], (4, 4)))
        assert len(early(x, output_hidden_states=True).hidden_states) == 2
    early.out_indices = [3]
    with pytest.raises(ValueError, match="holds only the first 1 blocks"):
        early(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_finite(dtype):
    model = LocAtViTForSemanticSegmentation(tiny_config()).eval().to(dtype)
    with torch.no_grad():
        logits = model(pixels(height=48, width=56).to(dtype), interpolate_pos_encoding=True).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = LocAtViTForImageClassification(tiny_config()).eval()(pixels()).logits
    assert torch.isfinite(logits).all()


def test_torch_compile_matches_eager():
    model = LocAtViTForImageClassification(tiny_config()).eval()
    x = pixels()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits, rtol=1e-4, atol=1e-5)


def test_config_default_for_interpolation():
    """Segmentation models (and the image-segmentation pipeline, which cannot pass the argument) take any size when
    the config says so; an explicit argument still wins."""
    model = LocAtViTForSemanticSegmentation(tiny_config(interpolate_pos_encoding=True)).eval()
    x = pixels(height=48, width=40)
    with torch.no_grad():
        assert model(x).logits.shape == (2, 5, 6, 5)
    with pytest.raises(ValueError, match="or set it in the config"):
        model(x, interpolate_pos_encoding=False)


def test_new_segmentation_head_is_initialized_on_a_classification_checkpoint(tmp_path):
    """Fine-tuning habit: a classification checkpoint, `num_labels` of the new task, a fresh head (trunc-normal
    1x1 convs, zero biases, unit GroupNorm) on the checkpoint's backbone, and a finite loss."""
    classifier = LocAtViTForImageClassification(tiny_config(num_labels=8))
    classifier.save_pretrained(tmp_path)
    model = LocAtViTForSemanticSegmentation.from_pretrained(tmp_path, num_labels=9)
    assert model.config.num_labels == 9 and len(model.config.id2label) == 9
    head = model.decode_head
    for conv in (head.projection, head.classifier):
        assert torch.isfinite(conv.weight).all() and 0.01 < conv.weight.std() < 0.03
    assert torch.all(head.classifier.bias == 0) and torch.all(head.norm.weight == 1) and torch.all(head.norm.bias == 0)
    for key, value in model.locatvit.state_dict().items():
        assert torch.equal(classifier.locatvit.state_dict()[key], value), key
    loss = model(pixels(), labels=torch.randint(0, 9, (2, 32, 32))).loss
    assert torch.isfinite(loss)


def test_training_after_inference_mode():
    """Cached grid tables first built under `torch.inference_mode()` still serve a training step."""
    model = LocAtViTForSemanticSegmentation(tiny_config()).eval()
    x = pixels(height=56, width=24)
    with torch.inference_mode():
        model(x, interpolate_pos_encoding=True)
    model.train()
    loss = model(x, labels=torch.randint(0, 5, (2, 56, 24)), interpolate_pos_encoding=True).loss
    loss.backward()
    assert torch.isfinite(loss)


def ops_run(function, *args, names: set[str]) -> tuple[torch.Tensor, set[str]]:
    """`function(*args)` and which of the aten ops `names` it ran (e.g. `aten::gelu` out of place, `aten::gelu_` in
    place)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        output = function(*args)
    return output, names & {event.key for event in profiler.key_averages()}


def activation_ops(mlp, x: torch.Tensor) -> tuple[torch.Tensor, set[str]]:
    return ops_run(mlp, x, names={"aten::gelu", "aten::gelu_"})


def test_mlp_activation_in_place_only_where_nothing_else_reads_fc1():
    """Without autograd the GELU overwrites fc1's output (same values, one buffer less); with autograd, with a
    hook on fc1 or a global one, or with another activation swapped in, it does not, and the hook sees fc1's own
    output."""
    model = LocAtViTModel(tiny_config()).eval()
    mlp = model.encoder.layers[0].mlp
    x = torch.randn(2, 17, 32)
    expected = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x))).detach()
    with torch.no_grad():
        output, ops = activation_ops(mlp, x)
    assert ops == {"aten::gelu_"} and torch.equal(output, expected)
    output, ops = activation_ops(mlp, x)
    assert ops == {"aten::gelu"} and torch.equal(output.detach(), expected) and output.requires_grad
    seen = []
    handle = mlp.fc1.register_forward_hook(lambda module, inputs, out: seen.append(out))
    with torch.no_grad():
        output, ops = activation_ops(mlp, x)
    handle.remove()
    assert ops == {"aten::gelu"} and torch.equal(output, expected)
    torch.testing.assert_close(seen[0], x @ mlp.fc1.weight.T + mlp.fc1.bias)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, out: None)
    with torch.no_grad():
        output, ops = activation_ops(mlp, x)
    handle.remove()
    assert ops == {"aten::gelu"} and torch.equal(output, expected)
    mlp.activation_fn = torch.nn.ReLU()
    with torch.no_grad():
        output, ops = activation_ops(mlp, x)
    assert not ops and torch.equal(output, mlp.fc2(torch.relu(mlp.fc1(x))))


def test_residual_sums_into_branch_outputs_only_where_nothing_else_reads_them():
    """Without autograd a layer sums the residual into its branches' fresh outputs (same values); the residual (a
    recorded hidden state) is never written, and a hooked module's output is left as the hook saw it."""
    model = LocAtViTModel(tiny_config()).eval()
    layer = model.encoder.layers[0]
    hidden = torch.randn(2, 17, 32)
    kept = hidden.clone()
    reference = layer(hidden.clone().requires_grad_(), (4, 4)).detach()  # with autograd: out of place
    with torch.no_grad():
        output, ops = ops_run(layer, hidden, (4, 4), names={"aten::add", "aten::add_"})
    assert torch.equal(hidden, kept) and torch.equal(output, reference) and ops == {"aten::add_"}
    seen = {}
    handles = [
        module.register_forward_hook(lambda module, inputs, out, name=name: seen.update({name: (out, out.clone())}))
        for name, module in (("o_proj", layer.attention.o_proj), ("mlp", layer.mlp))
    ]
    with torch.no_grad():
        output = layer(hidden, (4, 4))
    for handle in handles:
        handle.remove()
    assert torch.equal(output, reference) and torch.equal(hidden, kept)
    for name, (held, as_seen) in seen.items():
        assert torch.equal(held, as_seen), f"{name}'s output was overwritten after its hook saw it"
    with torch.no_grad():
        hidden_states = model(pixels(), output_hidden_states=True).hidden_states
        for index, block in enumerate(model.encoder.layers):
            assert torch.equal(hidden_states[index + 1], block(hidden_states[index].clone(), (4, 4)))
    # Under autocast the branches come out in bfloat16: the float32 residual stream stays float32, with the values
    # of the out-of-place sums (which hooks on the branches' modules force).
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        output = layer(hidden, (4, 4))
        handles = [module.register_forward_hook(lambda *args: None) for module in (layer.attention, layer.mlp)]
        reference = layer(hidden, (4, 4))
    for handle in handles:
        handle.remove()
    assert output.dtype == reference.dtype == torch.float32 and torch.equal(output, reference)
