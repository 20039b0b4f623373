"""Bad inputs, bad checkpoints, extreme sizes and precisions: clear errors, never silent garbage."""

import ast
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import locatvit_hf
from locatvit_hf import (
    LocAtViTConfig,
    LocAtViTForImageClassification,
    LocAtViTForSemanticSegmentation,
    LocAtViTModel,
)
from locatvit_hf.attention_locatvit import full_bias
from locatvit_hf.modeling_locatvit import LocAtViTGaussianBias

from .conftest import ALL_CLASSES, tiny_config
from .test_convert import timm_state_dict


@pytest.fixture(scope="module")
def models():
    config = tiny_config()
    return {cls: cls(config).eval() for cls in ALL_CLASSES}


# ---------------------------------------------------------------- 1. inputs


@pytest.mark.parametrize("model_class", ALL_CLASSES)
@pytest.mark.parametrize(
    "pixel_values, error, fragments",
    [
        (torch.randn(2, 1, 32, 32), ValueError, ["1 channels", "expects 3"]),
        (torch.randn(2, 4, 32, 32), ValueError, ["4 channels"]),
        (torch.randn(3, 32, 32), ValueError, ["(3, 32, 32)", "unsqueeze(0)"]),
        (torch.randn(1, 2, 3, 32, 32), ValueError, ["(1, 2, 3, 32, 32)"]),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), TypeError, ["torch.uint8", "image processor"]),
        (torch.randint(0, 255, (2, 3, 32, 32)), TypeError, ["torch.int64"]),
        (torch.randn(1, 3, 7, 32), ValueError, ["7x32", "smaller than one 8x8 patch"]),
        (torch.randn(0, 3, 32, 32), ValueError, ["empty batch"]),
        (torch.randn(1, 3, 48, 32), ValueError, ["(48, 32)", "(32, 32)", "interpolate_pos_encoding=True"]),
        ([[0.0]], TypeError, ["list"]),
    ],
)
def test_bad_pixel_values(models, model_class, pixel_values, error, fragments):
    # Dense models take other sizes unless told not to (tests/test_contracts.py).
    refuse_other_sizes = {"interpolate_pos_encoding": False} if model_class.interpolates_by_default else {}
    with pytest.raises(error) as info:
        models[model_class](pixel_values, **refuse_other_sizes)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_torchscript_tracing_is_refused_with_the_export_routes(models):
    with pytest.raises(RuntimeError, match="torch.export.export.*locatvit-export"):
        torch.jit.trace(models[LocAtViTModel], (torch.randn(1, 3, 32, 32),), strict=False)


def test_missing_pixel_values(models):
    with pytest.raises(ValueError, match="`pixel_values` is required"):
        models[LocAtViTModel]()


@pytest.mark.parametrize(
    "labels, error, fragments",
    [
        (torch.randint(0, 5, (2, 1, 32, 32)), ValueError, ["(2, 1, 32, 32)", "(batch, height, width)"]),
        (torch.randint(0, 5, (3, 32, 32)), ValueError, ["(3, 32, 32)", "(2, H, W)"]),
        (torch.full((2, 32, 32), 7), ValueError, ["value 7", "[0, 5)", "ignore index 255"]),
        (torch.full((2, 32, 32), -1), ValueError, ["value -1"]),
        (torch.rand(2, 32, 32), TypeError, ["torch.float32"]),
    ],
)
def test_bad_segmentation_labels(models, labels, error, fragments):
    with pytest.raises(error) as info:
        models[LocAtViTForSemanticSegmentation](torch.randn(2, 3, 32, 32), labels=labels)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_ignore_index_is_not_out_of_range(models):
    labels = torch.full((2, 32, 32), 255)
    labels[:, 0, 0] = 4
    loss = models[LocAtViTForSemanticSegmentation](torch.randn(2, 3, 32, 32), labels=labels).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "labels, fragments",
    [
        (torch.tensor([0, 5]), ["label 5", "[0, 5)"]),
        (torch.tensor([-2, 1]), ["label -2"]),
        (torch.tensor([1]), ["1 entries", "2 images"]),
    ],
)
def test_bad_classification_labels(models, labels, fragments):
    with pytest.raises(ValueError) as info:
        models[LocAtViTForImageClassification](torch.randn(2, 3, 32, 32), labels=labels)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


# ---------------------------------------------------------------- 2. extreme sizes and precisions


@pytest.mark.parametrize("height, width", [(8, 8), (8, 1024), (33, 17), (1024, 1024)])
def test_extreme_sizes_are_finite(height, width):
    config = tiny_config(num_hidden_layers=1, hidden_size=16, intermediate_size=32)
    model = LocAtViTForSemanticSegmentation(config).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, height, width), interpolate_pos_encoding=True).logits
    assert logits.shape == (1, 5, -(-height // 8), -(-width // 8))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("height, width", [(8, 8), (40, 27), (256, 256)])
def test_precisions_are_finite(dtype, height, width):
    model = LocAtViTModel(tiny_config(num_hidden_layers=1)).eval().to(dtype)
    with torch.no_grad():
        out = model(torch.randn(2, 3, height, width, dtype=dtype), interpolate_pos_encoding=True).last_hidden_state
    assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_finite_for_variances_near_zero(dtype):
    """Variances driven to ~0 (sigmoid saturated) on a grid 16x the initial one: eps and the clamp keep the bias
    finite in half precision, with the full strength on the diagonal and exact zeros far away."""
    config = tiny_config(image_size=512, patch_size=8)  # initial grid 64 x 64: eps = 0.4, clamp -1984.5
    module = LocAtViTGaussianBias(config).eval()
    with torch.no_grad():
        module.variance_proj.weight.zero_()
        module.variance_proj.bias.fill_(-1e4)  # var = c * sigmoid(-1e4 - shift) = 0
        module.strength_proj.weight.zero_()
        module.strength_proj.bias.fill_(3.0)
        query = torch.randn(1, 2, 1 + 96 * 80, config.head_dim, dtype=dtype)
        bias = full_bias(*module(query, (96, 80)), 1).to(dtype)  # as the backends write it for attention
    assert bias.dtype == dtype and torch.isfinite(bias).all()
    strength = torch.nn.functional.softplus(torch.tensor(3.0))
    diagonal = bias[0, 0, 1:, 1:].diagonal()
    torch.testing.assert_close(diagonal.float(), strength.expand_as(diagonal), rtol=1e-2, atol=1e-2)
    assert 0 <= bias[0, 0, 1, 1 + 5] < 1e-6  # 5 columns away: alpha * exp(-12.5 / 0.4)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    height=st.integers(8, 72),
    width=st.integers(8, 72),
    use_gaussian_attention=st.booleans(),
)
def test_eager_equals_sdpa_property(batch, height, width, use_gaussian_attention):
    config = tiny_config(num_hidden_layers=1, use_gaussian_attention=use_gaussian_attention)
    torch.manual_seed(0)
    eager = LocAtViTForSemanticSegmentation._from_config(config, attn_implementation="eager").eval()
    sdpa = LocAtViTForSemanticSegmentation._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    x = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        a = eager(x, interpolate_pos_encoding=True, output_hidden_states=True)
        b = sdpa(x, interpolate_pos_encoding=True)
    grid = (-(-height // 8), -(-width // 8))
    assert a.logits.shape == (batch, 5, *grid)
    assert a.hidden_states[0].shape == (batch, 1 + grid[0] * grid[1], 32)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- 3. checkpoints


def convert_cli(checkpoint, output):
    return subprocess.run(
        [sys.executable, "-m", "locatvit_hf.convert", "--checkpoint", str(checkpoint), "--output", str(output)],
        capture_output=True,
        text=True,
    )


def assert_cli_refuses(result, *fragments):
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_converter_refuses_truncated_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(timm_state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:5000])
    assert_cli_refuses(convert_cli(path, tmp_path / "out"), "model.safetensors", "not a readable safetensors")


def test_converter_refuses_corrupt_pth(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"\x80\x04garbage" * 10)
    assert_cli_refuses(convert_cli(path, tmp_path / "out"), "model.pth", "weights-only")


def test_converter_refuses_shape_mismatch(tmp_path):
    state_dict = timm_state_dict()
    state_dict["blocks.1.mlp.fc2.weight"] = torch.zeros(32, 7)
    save_file(state_dict, str(tmp_path / "model.safetensors"))
    assert_cli_refuses(convert_cli(tmp_path / "model.safetensors", tmp_path / "out"), "shape mismatch", "mlp.fc2")


def test_converter_refuses_another_architecture(tmp_path):
    """A Transformers ViT checkpoint (different key names) is not mistaken for the original's."""
    from transformers import ViTConfig, ViTModel

    ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path / "vit")
    assert_cli_refuses(convert_cli(tmp_path / "vit", tmp_path / "out"), "not a timm ViT/LocAtViT", "cls_token")


def test_converter_refuses_text_file(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_text("just some text")
    assert_cli_refuses(convert_cli(path, tmp_path / "out"), "weights.pth")


@pytest.fixture
def saved_classifier(tmp_path):
    folder = tmp_path / "classifier"
    LocAtViTForImageClassification(tiny_config()).save_pretrained(folder)
    return folder


def test_from_pretrained_refuses_truncated_weights(saved_classifier, tmp_path):
    weights = saved_classifier / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(Exception, match="(?i)deserializ|incomplete|truncat"):
        LocAtViTForImageClassification.from_pretrained(saved_classifier)


def test_from_pretrained_refuses_shape_mismatch(saved_classifier):
    config = json.loads((saved_classifier / "config.json").read_text())
    config["intermediate_size"] = 96
    (saved_classifier / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        LocAtViTForImageClassification.from_pretrained(saved_classifier)


def test_classification_checkpoint_into_segmentation_says_what_is_new(saved_classifier):
    model, info = LocAtViTForSemanticSegmentation.from_pretrained(saved_classifier, output_loading_info=True)
    assert sorted(info["missing_keys"]) == sorted(k for k in model.state_dict() if k.startswith("decode_head."))
    # The classifier, and the final norm that only the classifier reads.
    assert set(info["unexpected_keys"]) == {
        "classifier.weight",
        "classifier.bias",
        "locatvit.layernorm.weight",
        "locatvit.layernorm.bias",
    }
    reference = LocAtViTForImageClassification.from_pretrained(saved_classifier).locatvit.state_dict()
    for key, value in model.locatvit.state_dict().items():
        assert torch.equal(reference[key], value), key


# ---------------------------------------------------------------- 4. config


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("hidden_size", -32, "`hidden_size` must be a positive integer, got -32"),
        ("num_attention_heads", 0, "`num_attention_heads` must be a positive integer, got 0"),
        ("num_attention_heads", 3, "`hidden_size` (32) must be divisible by `num_attention_heads` (3)"),
        ("hidden_act", "swishy", "Unknown `hidden_act` 'swishy'"),
        ("patch_size", 64, "`patch_size` 64 is larger than the image height 32"),
        ("drop_path_rate", 1.5, "`drop_path_rate` must be in [0, 1), got 1.5"),
        ("image_size", [32], "`image_size` must be a positive int or a (height, width) pair"),
    ],
)
def test_config_validation(field, value, fragment, tmp_path):
    with pytest.raises(ValueError) as info:
        tiny_config(**{field: value})
    assert fragment in str(info.value)
    # The same check runs when a saved config is loaded.
    tiny_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved[field] = value
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError) as info:
        LocAtViTConfig.from_pretrained(tmp_path)
    assert fragment in str(info.value)


def test_config_label_mismatch():
    with pytest.raises(ValueError, match="`id2label` has 2 entries but `num_labels` is 3"):
        LocAtViTConfig(id2label={0: "a", 1: "b"}, num_labels=3)


# ---------------------------------------------------------------- 5. determinism


def test_same_seed_same_input_bit_identical():
    def run():
        torch.manual_seed(1234)
        model = LocAtViTForSemanticSegmentation(tiny_config()).eval()
        torch.manual_seed(99)
        x = torch.randn(2, 3, 40, 24)
        with torch.no_grad():
            return model(x, interpolate_pos_encoding=True).logits

    assert torch.equal(run(), run())


def test_no_bare_asserts_in_library_code():
    """Validation must survive `python -O`."""
    package = Path(locatvit_hf.__file__).parent
    for source in package.glob("*.py"):
        tree = ast.parse(source.read_text())
        asserts = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]
        assert not asserts, f"{source.name}: assert at lines {asserts}"


def test_cli_survives_optimized_python(tmp_path):
    """Under `python -O` the converter still refuses a foreign checkpoint with the same one-line error."""
    save_file({"fc.weight": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    result = subprocess.run(
        [
            sys.executable,
            "-O",
            "-m",
            "locatvit_hf.convert",
            "--checkpoint",
            str(tmp_path / "foreign.safetensors"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert_cli_refuses(result, "not a timm ViT/LocAtViT")
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


class _CodeRunningPickle:
    def __reduce__(self):
        return (exec, ("open('pwned.txt', 'w').write('x')",))


def test_pickle_that_would_run_code_is_refused_by_the_cli(tmp_path, monkeypatch):
    """`.pth` files are read with `weights_only=True`: a pickle that executes code on load is refused, and runs
    nothing."""
    monkeypatch.chdir(tmp_path)
    torch.save({"model": _CodeRunningPickle()}, tmp_path / "evil.pth")
    result = subprocess.run(
        [sys.executable, "-m", "locatvit_hf.convert", "--checkpoint", "evil.pth", "--output", "out"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert_cli_refuses(result, "evil.pth", "weights-only", "Pickles that run code are refused")
    assert not (tmp_path / "pwned.txt").exists()


def test_config_file_contradicting_itself_is_refused(tmp_path):
    tiny_config(num_labels=2, id2label={0: "a", 1: "b"}).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["num_labels"] = 3
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="`id2label` has 2 entries but `num_labels` is 3"):
        LocAtViTConfig.from_pretrained(tmp_path)
    # Asking for another number of classes when loading is the usual way to get a new head, not a contradiction.
    assert LocAtViTConfig.from_pretrained(tmp_path.parent / tmp_path.name, num_labels=4).num_labels == 4
