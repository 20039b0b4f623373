"""locatvit_hf.visualization: every plot writes a PNG and holds the expected axes and images; the numbers behind the
plots are the model's own (eager attention weights, `variance_and_strength` of the real queries)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from locatvit_hf import (
    LocAtViTBackbone,
    LocAtViTForImageClassification,
    LocAtViTForSemanticSegmentation,
    LocAtViTModel,
)

from .conftest import tiny_config

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from locatvit_hf import visualization as vis  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, f"{path} was not written"
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        assert image.width > 100 and image.height > 100


def trained_like(model):
    """Gaussian parameters away from their initial values (variance 1, alpha ln 2), as after training."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "variance_proj" in name or "strength_proj" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5 + 1.0)
    return model.eval()


@pytest.fixture
def classifier():
    config = tiny_config(num_hidden_layers=3)
    return trained_like(LocAtViTForImageClassification._from_config(config, attn_implementation="eager"))


@pytest.fixture
def pixel_values():
    return torch.randn(3, 3, 32, 32)


def test_import_does_not_load_matplotlib():
    code = (
        "import sys, locatvit_hf, locatvit_hf.training, locatvit_hf.visualization; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------------------------------
# Gaussian statistics
# ---------------------------------------------------------------------------------------------------------------------


def test_gaussian_statistics_are_those_of_the_real_queries(classifier, pixel_values):
    statistics = vis.gaussian_statistics(classifier, pixel_values)
    assert list(statistics) == [0, 1, 2]
    with torch.no_grad():
        hidden_states = classifier(pixel_values, output_hidden_states=True).hidden_states
    config = classifier.config
    for index, layer in enumerate(classifier.locatvit.encoder.layers):
        # Independently: the queries of block `index` from its input (hidden_states[index]).
        with torch.no_grad():
            query = layer.attention.q_proj(layer.layernorm_before(hidden_states[index]))
            query = query.view(3, -1, config.num_attention_heads, config.head_dim).transpose(1, 2)[:, :, 1:]
            variance, strength = layer.attention.gaussian_bias.variance_and_strength(query, config.grid_size)
        entry = statistics[index]
        assert entry["variance_row"].shape == (3, config.num_attention_heads, 16)
        np.testing.assert_allclose(entry["variance_row"], variance[..., 0].numpy(), rtol=1e-5)
        np.testing.assert_allclose(entry["variance_col"], variance[..., 1].numpy(), rtol=1e-5)
        np.testing.assert_allclose(entry["strength"], strength[..., 0].numpy(), rtol=1e-5)
    # Trained-like parameters: not the initial values any more.
    assert not np.allclose(statistics[0]["variance_row"], 1.0, atol=0.05)


def test_plot_gaussian_statistics(classifier, pixel_values, tmp_path):
    path = tmp_path / "plots" / "gaussian.png"
    figure = vis.plot_gaussian_statistics(classifier, pixel_values, save_path=path)
    assert_png(path)
    variance_ax, strength_ax = figure.axes  # exactly two axes
    assert [tick.get_text() for tick in variance_ax.get_xticklabels()] == ["0", "1", "2"]
    assert [tick.get_text() for tick in strength_ax.get_xticklabels()] == ["0", "1", "2"]
    assert variance_ax.get_yscale() == "log"
    # One box per layer and axis on the left (row, column), one per layer on the right.
    assert len(variance_ax.patches) == 6 and len(strength_ax.patches) == 3
    assert [text.get_text() for text in variance_ax.get_legend().get_texts()] == ["row variance", "column variance"]
    # The white mean markers sit at the means of the statistics.
    statistics = vis.gaussian_statistics(classifier, pixel_values)
    mean_lines = [line for line in strength_ax.lines if line.get_marker() == "o"]
    np.testing.assert_allclose(
        [line.get_ydata()[0] for line in mean_lines], [statistics[i]["strength"].mean() for i in range(3)], rtol=1e-5
    )


def test_gaussian_plots_need_gaussian_attention(pixel_values):
    model = LocAtViTForImageClassification(tiny_config(use_gaussian_attention=False)).eval()
    with pytest.raises(ValueError, match="use_gaussian_attention"):
        vis.plot_gaussian_statistics(model, pixel_values)
    with pytest.raises(ValueError, match="use_gaussian_attention"):
        vis.plot_attention_map(model, pixel_values, query=(1, 1))


# ---------------------------------------------------------------------------------------------------------------------
# Attention maps
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer, head, query", [(0, 0, (1, 2)), (-1, 1, (3, 0)), (1, 1, (0, 3))])
def test_attention_maps_equal_the_models_eager_attention(classifier, pixel_values, layer, head, query):
    maps = vis.attention_maps(classifier, pixel_values, query=query, layer=layer, head=head)
    with torch.no_grad():
        attentions = classifier(pixel_values[:1], output_attentions=True).attentions
    index = 1 + query[0] * 4 + query[1]
    reference = attentions[layer][0, head, index]
    np.testing.assert_allclose(maps["with_bias"], reference[1:].reshape(4, 4).numpy(), atol=1e-6)
    assert maps["cls_with_bias"] == pytest.approx(float(reference[0]), abs=1e-6)
    assert maps["without_bias"].sum() + maps["cls_without_bias"] == pytest.approx(1.0, abs=1e-5)
    assert not np.allclose(maps["with_bias"], maps["without_bias"], atol=1e-4)
    # The bias is the layer's Gaussian: largest at the query, decreasing with the distance.
    bias = maps["bias"]
    assert bias.argmax() == query[0] * 4 + query[1] and (bias > 0).all()
    assert maps["layer"] == layer % 3 and maps["grid"] == (4, 4)


def test_attention_map_of_another_image_size_and_of_every_model_class(classifier):
    state = classifier.state_dict()
    pixel_values = torch.randn(1, 3, 40, 24)  # grid 5 x 3, position embeddings resampled
    reference = vis.attention_maps(classifier, pixel_values, query=(4, 2), layer=2, head=1)
    assert reference["grid"] == (5, 3) and reference["with_bias"].shape == (5, 3)
    with torch.no_grad():
        attentions = classifier(pixel_values, output_attentions=True, interpolate_pos_encoding=True).attentions
    np.testing.assert_allclose(reference["with_bias"].reshape(-1), attentions[2][0, 1, -1, 1:].numpy(), atol=1e-6)
    for model_class in (LocAtViTModel, LocAtViTBackbone, LocAtViTForSemanticSegmentation):
        model = model_class(classifier.config)
        prefix = "" if model_class in (LocAtViTModel, LocAtViTBackbone) else "locatvit."
        weights = {prefix + k[len("locatvit.") :]: v for k, v in state.items() if k.startswith("locatvit.")}
        model.load_state_dict(weights, strict=False)
        maps = vis.attention_maps(model.eval(), pixel_values, query=(4, 2), layer=2, head=1)
        np.testing.assert_allclose(maps["with_bias"], reference["with_bias"], atol=1e-6)


def test_attention_maps_reject_bad_arguments(classifier, pixel_values):
    with pytest.raises(ValueError, match="outside"):
        vis.attention_maps(classifier, pixel_values, query=(4, 0))
    with pytest.raises(ValueError, match="layer"):
        vis.attention_maps(classifier, pixel_values, query=(0, 0), layer=3)
    with pytest.raises(ValueError, match="head"):
        vis.attention_maps(classifier, pixel_values, query=(0, 0), head=2)


def test_plot_attention_map(classifier, pixel_values, tmp_path):
    from matplotlib.patches import Rectangle

    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)  # drawn at twice the input size
    path = tmp_path / "attention.png"
    figure = vis.plot_attention_map(
        classifier, pixel_values[:1], query=(1, 2), layer=2, head=1, image=image, save_path=path
    )
    assert_png(path)
    assert len(figure.axes) == 4
    # The image in every panel, and a map over it in the last three (bias, without, with).
    assert [len(ax.images) for ax in figure.axes] == [1, 2, 2, 2]
    maps = vis.attention_maps(classifier, pixel_values, query=(1, 2), layer=2, head=1)
    for ax, key in zip(figure.axes[1:], ("bias", "without_bias", "with_bias")):
        np.testing.assert_allclose(ax.images[1].get_array(), maps[key])
        assert ax.images[1].get_extent() == [0, 64, 64, 0]  # the 4 x 4 grid spread over the 64 px picture
    np.testing.assert_array_equal(figure.axes[0].images[0].get_array(), image)
    # The query patch is outlined: column 2, row 1 of 16 px cells.
    rectangles = [p for p in figure.axes[0].patches if isinstance(p, Rectangle)]
    assert len(rectangles) == 1 and rectangles[0].get_xy() == (32.0, 16.0) and rectangles[0].get_width() == 16.0
    assert "without" in figure.axes[2].get_title() and "with B" in figure.axes[3].get_title()


def test_plot_attention_map_of_a_padded_input(classifier, tmp_path):
    """33 x 19 px: padded to 40 x 24, a 5 x 3 grid of 8 px patches; the maps cover the padded area."""
    pixel_values = torch.randn(1, 3, 33, 19)
    path = tmp_path / "padded.png"
    figure = vis.plot_attention_map(classifier, pixel_values, query=(4, 2), layer=0, head=0, save_path=path)
    assert_png(path)
    for ax in figure.axes[1:]:
        assert ax.images[1].get_array().shape == (5, 3)
        assert ax.images[1].get_extent() == [0, 24, 40, 0]
        assert ax.get_xlim() == (0, 19) and ax.get_ylim() == (33, 0)  # the view is the image itself
    (rectangle,) = figure.axes[0].patches
    assert rectangle.get_xy() == (16, 32) and (rectangle.get_width(), rectangle.get_height()) == (8, 8)
    # Without `image`, the input itself is drawn, rescaled to [0, 1].
    shown = figure.axes[0].images[0].get_array()
    assert shown.shape == (33, 19, 3) and shown.min() == 0.0 and shown.max() == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def segmenter():
    return LocAtViTForSemanticSegmentation(tiny_config(num_labels=4)).eval()


def test_predict_segmentation(segmenter, pixel_values):
    predictions = vis.predict_segmentation(segmenter, pixel_values)
    assert len(predictions) == 3 and all(p.shape == (32, 32) for p in predictions)
    with torch.no_grad():
        logits = segmenter(pixel_values).logits
    upsampled = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    np.testing.assert_array_equal(np.stack(predictions), upsampled.argmax(1).numpy())
    resized = vis.predict_segmentation(segmenter, pixel_values, label_size=(20, 24))
    assert resized[0].shape == (20, 24) and set(np.unique(resized[0])) <= {0, 1, 2, 3}


def test_plot_segmentation_with_ground_truth(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 40, 3), dtype=np.uint8), Image.new("RGB", (40, 32), (120, 30, 200))]
    labels = [np.zeros((32, 40), dtype=np.int64), np.full((32, 40), 2)]
    labels[0][:5] = 255  # ignored: left uncoloured
    predictions = [np.zeros((16, 20), dtype=np.int64), np.full((32, 40), 3)]  # the first at half size: resized
    names = {0: "background", 1: "cat", 2: "dog", 3: "tree"}
    path = tmp_path / "segmentation.png"
    figure = vis.plot_segmentation(images, predictions, names, labels=labels, save_path=path)
    assert_png(path)
    assert len(figure.axes) == 6  # 2 rows x (image, ground truth, prediction)
    assert all(len(ax.images) == 1 for ax in figure.axes)
    assert [ax.get_title() for ax in figure.axes[:3]] == ["image", "ground truth", "prediction"]
    # The legend names the classes that appear, in class order ("cat" appears nowhere).
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["background", "dog", "tree"]
    colours = vis.segmentation_palette(4)
    handle_colours = [tuple(handle.get_facecolor()[:3]) for handle in legend.legend_handles]
    np.testing.assert_allclose(handle_colours, colours[[0, 2, 3]])
    # Overlays: the class colour mixed into the grey image; ignored pixels keep the grey image.
    overlay = figure.axes[1].images[0].get_array()
    assert overlay.shape == (32, 40, 3)
    grey = images[0][:5].astype(float) @ np.array([0.299, 0.587, 0.114]) / 255
    np.testing.assert_allclose(overlay[:5], np.repeat(grey[..., None], 3, axis=-1), atol=1e-6)
    np.testing.assert_allclose(
        figure.axes[5].images[0].get_array()[0, 0], 0.4 * (np.array([120, 30, 200]) @ [0.299, 0.587, 0.114]) / 255
        + 0.6 * colours[3], atol=1e-6
    )  # fmt: skip


def test_plot_segmentation_predictions_only_and_all_classes(segmenter, pixel_values, tmp_path):
    predictions = vis.predict_segmentation(segmenter, pixel_values)
    names = ["sky", "road", "car", "person"]
    path = tmp_path / "only.png"
    figure = vis.plot_segmentation(list(np.zeros((3, 32, 32, 3), np.uint8)), predictions, names, save_path=path)
    assert_png(path)
    assert len(figure.axes) == 6 and all(len(ax.images) == 1 for ax in figure.axes)  # 3 rows x 2
    figure = vis.plot_segmentation([np.zeros((32, 32, 3))], predictions[:1], names, legend="all")
    assert [text.get_text() for text in figure.legends[0].get_texts()] == names
    with pytest.raises(ValueError, match="one entry per image"):
        vis.plot_segmentation([np.zeros((32, 32, 3))], predictions, names)
