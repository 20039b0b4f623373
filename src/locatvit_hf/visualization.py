"""Plots of what LocAtViT learns, with matplotlib (an optional extra: `pip install 'locatvit-hf[examples]'`).

- `plot_gaussian_statistics`: per layer, the distribution of the learned Gaussian variances (row and column axis) and
  strengths alpha of GAug over the patch queries of a set of images (numbers from `gaussian_statistics`).
- `plot_attention_map`: for one layer, head and query patch, the Gaussian bias and the attention over the patches
  without and with it, overlaid on the image (numbers from `attention_maps`).
- `plot_segmentation`: segmentation predictions (and optionally the ground truth) overlaid on images, with a legend of
  the class names (`predict_segmentation` turns a segmentation model's logits into class maps).

Every `plot_*` function returns a `matplotlib.figure.Figure` (made without pyplot: no global figure state, nothing
shown unless you display it, e.g. as a notebook cell's value) and, given `save_path`, writes it as a PNG. The
functions accept any LocAtViT model: `LocAtViTModel`, `LocAtViTBackbone` or a classification / segmentation model.
matplotlib is imported only when a plot is made; `import locatvit_hf` never imports it or this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.nn import functional as F

__all__ = [
    "attention_maps",
    "gaussian_statistics",
    "plot_attention_map",
    "plot_gaussian_statistics",
    "plot_segmentation",
    "predict_segmentation",
    "segmentation_palette",
]


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "locatvit_hf.visualization needs matplotlib: pip install 'locatvit-hf[examples]' (or matplotlib)."
        ) from error
    return matplotlib, Figure


def _save(figure, save_path, dpi: int) -> None:
    if save_path is not None:
        directory = os.path.dirname(os.fspath(save_path))
        if directory:
            os.makedirs(directory, exist_ok=True)
        figure.savefig(save_path, dpi=dpi)


def _encoder_owner(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding `embeddings` and `encoder`: the model itself (`LocAtViTModel`, `LocAtViTBackbone`) or its
    `locatvit` base model (classification and segmentation models)."""
    owner = getattr(model, "locatvit", model)
    if not (hasattr(owner, "embeddings") and hasattr(owner, "encoder")):
        raise TypeError(f"{type(model).__name__} is not a LocAtViT model (no embeddings/encoder).")
    return owner


@torch.no_grad()
def _run_encoder(model: torch.nn.Module, pixel_values: torch.Tensor) -> tuple[int, int]:
    """Run the embeddings and every block on `pixel_values` (any size: position embeddings resampled), in eval mode;
    returns the patch grid."""
    owner = _encoder_owner(model)
    if pixel_values.ndim == 3:
        pixel_values = pixel_values[None]
    was_training = model.training
    model.eval()
    try:
        weight = owner.embeddings.patch_embeddings.projection.weight
        hidden_states, grid_size = owner.embeddings(pixel_values.to(weight.device, weight.dtype), True)
        owner.encoder(hidden_states, grid_size)
    finally:
        model.train(was_training)
    return tuple(grid_size)


def _as_batch(pixel_values: torch.Tensor) -> torch.Tensor:
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim not in (3, 4):
        raise ValueError(
            "`pixel_values` must be a (batch, channels, height, width) or (channels, height, width) tensor."
        )
    return pixel_values[None] if pixel_values.ndim == 3 else pixel_values


# ---------------------------------------------------------------------------------------------------------------------
# Gaussian variances and strengths
# ---------------------------------------------------------------------------------------------------------------------


def _queries(attention: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, head_dim) queries of a `LocAtViTAttention` for its (normed) input."""
    shape = (*hidden_states.shape[:-1], -1, attention.head_dim)
    return attention.q_proj(hidden_states).view(shape).transpose(1, 2)


def gaussian_statistics(model: torch.nn.Module, pixel_values: torch.Tensor) -> dict[int, dict[str, np.ndarray]]:
    """Per layer, the Gaussian variance along rows (`"variance_row"`) and columns (`"variance_col"`) and the strength
    alpha (`"strength"`) of every patch query of every head and image: float arrays of shape (images, heads, patches),
    from `LocAtViTGaussianBias.variance_and_strength` of the layer's queries in a forward pass (eval mode)."""
    from .attention_locatvit import NUM_PREFIX_TOKENS

    pixel_values = _as_batch(pixel_values)
    owner = _encoder_owner(model)
    attentions = [
        (index, layer.attention)
        for index, layer in enumerate(owner.encoder.layers)
        if layer.attention.gaussian_bias is not None
    ]
    if not attentions:
        raise ValueError("The model has no Gaussian attention (`use_gaussian_attention=False`): nothing to plot.")
    statistics: dict[int, dict[str, np.ndarray]] = {}

    def make_hook(index):
        def pre_hook(attention, args):
            hidden_states, grid_size = args[0], tuple(args[1])
            query = _queries(attention, hidden_states)[:, :, NUM_PREFIX_TOKENS:]
            variance, strength = attention.gaussian_bias.variance_and_strength(query, grid_size)
            statistics[index] = {
                "variance_row": variance[..., 0].float().cpu().numpy(),
                "variance_col": variance[..., 1].float().cpu().numpy(),
                "strength": strength[..., 0].float().cpu().numpy(),
            }

        return pre_hook

    hooks = [attention.register_forward_pre_hook(make_hook(index)) for index, attention in attentions]
    try:
        _run_encoder(model, pixel_values)
    finally:
        for hook in hooks:
            hook.remove()
    return dict(sorted(statistics.items()))


def plot_gaussian_statistics(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    save_path: str | os.PathLike | None = None,
    figsize: tuple[float, float] = (9.0, 3.6),
    dpi: int = 110,
):
    """Box plots, per layer, of the learned Gaussian variances (row and column axis, log scale; left) and strengths
    alpha (right) over all patch queries, heads and images of `pixel_values` (whiskers: 5th-95th percentile, white
    dot: mean). Dashed lines: the values at initialization (variance 1, alpha ln 2) and the largest variance, c =
    max(H0, W0)^2. Returns the Figure (two axes); `save_path` writes it as a PNG."""
    _, Figure = _matplotlib()
    statistics = gaussian_statistics(model, pixel_values)
    layers = list(statistics)
    figure = Figure(figsize=figsize, layout="constrained")
    var_ax, alpha_ax = figure.subplots(1, 2)
    box = {"showfliers": False, "whis": (5, 95), "showmeans": True, "patch_artist": True, "widths": 0.35}
    mean_style = {"marker": "o", "markerfacecolor": "white", "markeredgecolor": "black", "markersize": 4}
    positions = np.arange(len(layers), dtype=float)
    for offset, key, colour, label in (
        (-0.2, "variance_row", "#5b9bd5", "row variance"),
        (0.2, "variance_col", "#ed9f4a", "column variance"),
    ):
        parts = var_ax.boxplot(
            [statistics[i][key].reshape(-1) for i in layers],
            positions=positions + offset,
            meanprops=mean_style,
            **box,
        )
        for patch in parts["boxes"]:
            patch.set_facecolor(colour)
            patch.set_label(label)
    handles = var_ax.get_legend_handles_labels()
    var_ax.legend(handles[0][:1] + handles[0][-1:], [handles[1][0], handles[1][-1]], loc="best", fontsize=8)
    var_ax.set_yscale("log")
    var_ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    bias_module = next(
        layer.attention.gaussian_bias
        for layer in _encoder_owner(model).encoder.layers
        if layer.attention.gaussian_bias is not None
    )
    var_ax.axhline(bias_module.max_variance, color="grey", linestyle=":", linewidth=0.8)
    var_ax.set_ylabel("variance (patches²)")
    var_ax.set_title("Gaussian variance per layer")
    parts = alpha_ax.boxplot(
        [statistics[i]["strength"].reshape(-1) for i in layers], positions=positions, meanprops=mean_style, **box
    )
    for patch in parts["boxes"]:
        patch.set_facecolor("#2e8b57")
    alpha_ax.axhline(float(np.log(2.0)), color="grey", linestyle="--", linewidth=0.8)
    alpha_ax.set_ylabel("strength α")
    alpha_ax.set_title("Gaussian strength per layer")
    for ax in (var_ax, alpha_ax):
        ax.set_xticks(positions, [str(i) for i in layers])
        ax.set_xlabel("layer")
        ax.grid(axis="y", alpha=0.3)
    first = statistics[layers[0]]["strength"]
    figure.suptitle(
        f"{first.shape[0]} image(s) x {first.shape[1]} head(s) x {first.shape[2]} patch queries per layer",
        fontsize=9,
    )
    _save(figure, save_path, dpi)
    return figure


# ---------------------------------------------------------------------------------------------------------------------
# Attention of one query patch
# ---------------------------------------------------------------------------------------------------------------------


def attention_maps(
    model: torch.nn.Module, pixel_values: torch.Tensor, query: tuple[int, int], layer: int = -1, head: int = 0
) -> dict:
    """The attention of patch `query` = (row, column) in block `layer`, head `head`, for the first image of
    `pixel_values`, computed from that block's queries and keys:

    - `"with_bias"`: softmax(q k^T / sqrt(d) + B), the model's own attention (what `output_attentions` returns with
      eager attention), over the patch keys, as a (rows, columns) array;
    - `"without_bias"`: softmax(q k^T / sqrt(d)), the same logits without the Gaussian;
    - `"bias"`: the Gaussian bias B of the query over the patch keys (None for a model without GAug);
    - `"cls_with_bias"`, `"cls_without_bias"`: the weight on the CLS token (the maps above sum to 1 minus these);
    - `"grid"`, `"layer"`, `"head"`, `"query"`.
    """
    from .attention_locatvit import NUM_PREFIX_TOKENS, full_bias

    pixel_values = _as_batch(pixel_values)[:1]
    owner = _encoder_owner(model)
    layers = owner.encoder.layers
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"`layer` {layer} is out of range for {len(layers)} layers.")
    layer = layer % len(layers)
    attention = layers[layer].attention
    heads = attention.q_proj.out_features // attention.head_dim
    if not 0 <= head < heads:
        raise ValueError(f"`head` {head} is out of range for {heads} heads.")
    captured = {}

    def pre_hook(module, args):
        captured["hidden_states"], captured["grid"] = args[0], tuple(args[1])

    hook = attention.register_forward_pre_hook(pre_hook)
    try:
        _run_encoder(model, pixel_values)
    finally:
        hook.remove()
    height, width = captured["grid"]
    row, col = query
    if not (0 <= row < height and 0 <= col < width):
        raise ValueError(f"`query` {query} is outside the {height}x{width} patch grid.")
    with torch.no_grad():
        hidden_states = captured["hidden_states"]
        q = _queries(attention, hidden_states)
        k = attention.k_proj(hidden_states).view(q.shape[0], -1, q.shape[1], q.shape[-1]).transpose(1, 2)
        index = NUM_PREFIX_TOKENS + row * width + col
        logits = (q[0, head, index].float() @ k[0, head].float().T) * attention.scaling
        bias = None
        if attention.gaussian_bias is not None:
            profiles = attention.gaussian_bias(q, (height, width))
            bias = full_bias(*profiles, NUM_PREFIX_TOKENS)[0, head, index].float().clone()
        without = torch.softmax(logits, dim=-1)
        with_bias = torch.softmax(logits + bias, dim=-1) if bias is not None else without

    def grid_map(weights):
        return weights[NUM_PREFIX_TOKENS:].reshape(height, width).cpu().numpy()

    return {
        "with_bias": grid_map(with_bias),
        "without_bias": grid_map(without),
        "bias": grid_map(bias) if bias is not None else None,
        "cls_with_bias": float(with_bias[:NUM_PREFIX_TOKENS].sum()),
        "cls_without_bias": float(without[:NUM_PREFIX_TOKENS].sum()),
        "grid": (height, width),
        "layer": layer,
        "head": head,
        "query": (row, col),
    }


def _display_image(image, pixel_values: torch.Tensor) -> np.ndarray:
    """The image to draw: `image` (PIL or array) as an (H, W, 3) array, or `pixel_values` rescaled to [0, 1]."""
    if image is not None:
        array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        return array if array.ndim == 3 else np.repeat(array[..., None], 3, axis=-1)
    pixels = pixel_values.detach().float().cpu()[:3].permute(1, 2, 0).numpy()
    low, high = pixels.min(axis=(0, 1)), pixels.max(axis=(0, 1))
    return (pixels - low) / np.maximum(high - low, 1e-8)


def plot_attention_map(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    query: tuple[int, int],
    layer: int = -1,
    head: int = 0,
    image=None,
    save_path: str | os.PathLike | None = None,
    alpha: float = 0.6,
    cmap: str = "inferno",
    figsize: tuple[float, float] = (10.0, 2.9),
    dpi: int = 110,
):
    """Four panels for patch `query` = (row, column) of the first image, block `layer`, head `head`: the image with
    the query patch outlined; the Gaussian bias B of that query; its attention over the patches without the bias,
    softmax(q k^T / sqrt(d)); and with it, softmax(q k^T / sqrt(d) + B) (the model's attention). Each map is overlaid
    on the image (`image`: the picture to draw, PIL or array, default `pixel_values` rescaled), one cell per patch.
    The model must have GAug (`use_gaussian_attention=True`). Returns the Figure; `save_path` writes a PNG."""
    matplotlib, Figure = _matplotlib()
    from matplotlib.patches import Rectangle

    pixel_values = _as_batch(pixel_values)
    if _encoder_owner(model).encoder.layers[0].attention.gaussian_bias is None:
        raise ValueError(
            "The model has no Gaussian attention (`use_gaussian_attention=False`): there is no bias to compare with."
        )
    maps = attention_maps(model, pixel_values, query, layer, head)
    picture = _display_image(image, pixel_values[0])
    height, width = maps["grid"]
    patch_h, patch_w = _encoder_owner(model).embeddings.patch_embeddings.patch_size
    scale_y, scale_x = picture.shape[0] / pixel_values.shape[-2], picture.shape[1] / pixel_values.shape[-1]
    extent = (0, width * patch_w * scale_x, height * patch_h * scale_y, 0)  # the padded grid, in picture pixels
    figure = Figure(figsize=figsize, layout="constrained")
    axes = figure.subplots(1, 4)
    row, col = maps["query"]
    panels = [
        (None, "image, query patch"),
        (maps["bias"], "Gaussian bias B"),
        (maps["without_bias"], f"attention without B (CLS {100 * maps['cls_without_bias']:.0f} %)"),
        (maps["with_bias"], f"attention with B (CLS {100 * maps['cls_with_bias']:.0f} %)"),
    ]
    for ax, (values, title) in zip(axes, panels):
        ax.imshow(picture, extent=(0, picture.shape[1], picture.shape[0], 0))
        if values is not None:
            ax.imshow(values, cmap=cmap, alpha=alpha, extent=extent, interpolation="nearest")
        ax.add_patch(
            Rectangle(
                (col * patch_w * scale_x, row * patch_h * scale_y),
                patch_w * scale_x,
                patch_h * scale_y,
                fill=False,
                edgecolor="cyan",
                linewidth=1.5,
            )
        )
        ax.set_xlim(0, picture.shape[1])
        ax.set_ylim(picture.shape[0], 0)
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    figure.suptitle(f"layer {maps['layer']}, head {maps['head']}, query patch (row {row}, column {col})", fontsize=9)
    _save(figure, save_path, dpi)
    return figure


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation overlays
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_segmentation(
    model: torch.nn.Module, pixel_values: torch.Tensor, label_size: tuple[int, int] | None = None
) -> list[np.ndarray]:
    """Class maps of a LocAtViT segmentation model for a batch: the logits resized to `label_size` (default: the
    input size) as in `SegmentationTrainer`'s evaluation, then argmax. Returns one (H, W) int64 array per image."""
    from .training import logits_to_label_size

    pixel_values = _as_batch(pixel_values)
    was_training = model.training
    model.eval()
    try:
        parameter = next(model.parameters())
        logits = model(
            pixel_values=pixel_values.to(parameter.device, parameter.dtype), interpolate_pos_encoding=True
        ).logits
    finally:
        model.train(was_training)
    size = tuple(label_size) if label_size is not None else tuple(pixel_values.shape[-2:])
    logits = logits_to_label_size(logits, pixel_values.shape[-2:], size, model.config.patch_size)
    return list(logits.argmax(1).cpu().numpy())


def segmentation_palette(num_labels: int) -> np.ndarray:
    """(num_labels, 3) float RGB colours in [0, 1]: matplotlib's tab10 / tab20 for up to 20 classes, then seeded
    random colours."""
    matplotlib, _ = _matplotlib()
    if num_labels <= 10:
        colours = matplotlib.colormaps["tab10"].colors[:num_labels]
    elif num_labels <= 20:
        colours = matplotlib.colormaps["tab20"].colors[:num_labels]
    else:
        colours = np.random.default_rng(0).uniform(0.15, 1.0, size=(num_labels, 3))
    return np.asarray(colours, dtype=np.float64)


def _blend(picture: np.ndarray, label_map: np.ndarray, colours: np.ndarray, alpha: float, ignore_index: int):
    """Class colours over the image's grey levels (the image's own colours would mix with the class colours)."""
    picture = picture.astype(np.float64)
    if picture.max() > 1.0:
        picture = picture / 255.0
    picture = np.repeat((picture[..., :3] @ np.array([0.299, 0.587, 0.114]))[..., None], 3, axis=-1)
    valid = (label_map != ignore_index) & (label_map >= 0) & (label_map < len(colours))
    coloured = colours[np.where(valid, label_map, 0)]
    return np.where(valid[..., None], (1 - alpha) * picture + alpha * coloured, picture).clip(0, 1)


def _resize_nearest(label_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if label_map.shape == tuple(size):
        return label_map
    tensor = torch.as_tensor(np.asarray(label_map, dtype=np.int64))[None, None].float()
    return F.interpolate(tensor, size=tuple(size), mode="nearest")[0, 0].long().numpy()


def plot_segmentation(
    images: Sequence,
    predictions: Sequence,
    id2label: Mapping[int, str] | Sequence[str],
    labels: Sequence | None = None,
    save_path: str | os.PathLike | None = None,
    alpha: float = 0.6,
    legend: str = "present",
    ignore_index: int = 255,
    panel_size: float = 2.2,
    dpi: int = 110,
):
    """One row per image: the image, the ground truth overlaid (if `labels` are given) and the prediction overlaid
    (class colours with opacity `alpha` over the image in grey levels), with a legend of the class names under the
    panels. `images`: (H, W, 3) arrays or PIL images; `predictions` and `labels`: (H, W) class maps (resized to the
    image, nearest, if their size differs); `ignore_index` pixels stay uncoloured. `legend="present"` lists the
    classes that appear in the maps, `"all"` every class of `id2label`. Returns the Figure; `save_path` writes a PNG.
    """
    _, Figure = _matplotlib()
    from matplotlib.patches import Patch

    if len(images) != len(predictions) or (labels is not None and len(labels) != len(images)):
        raise ValueError("`images`, `predictions` (and `labels`) must have one entry per image.")
    if not len(images):
        raise ValueError("No image to draw.")
    if legend not in ("present", "all"):
        raise ValueError(f"`legend` must be 'present' or 'all', got {legend!r}.")
    names = dict(id2label) if isinstance(id2label, Mapping) else dict(enumerate(id2label))
    names = {int(k): str(v) for k, v in names.items()}
    colours = segmentation_palette(max(names) + 1 if names else 1)
    columns = 3 if labels is not None else 2
    figure = Figure(figsize=(panel_size * columns, panel_size * len(images) + 0.6), layout="constrained")
    axes = np.asarray(figure.subplots(len(images), columns, squeeze=False))
    present = set()
    for row, image in enumerate(images):
        picture = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        maps = [("prediction", np.asarray(predictions[row]))]
        if labels is not None:
            maps.insert(0, ("ground truth", np.asarray(labels[row])))
        axes[row, 0].imshow(picture)
        axes[row, 0].set_title("image" if row == 0 else "", fontsize=9)
        for column, (title, label_map) in enumerate(maps, start=1):
            label_map = _resize_nearest(label_map, picture.shape[:2])
            present.update(int(v) for v in np.unique(label_map) if v != ignore_index)
            axes[row, column].imshow(_blend(picture, label_map, colours, alpha, ignore_index))
            axes[row, column].set_title(title if row == 0 else "", fontsize=9)
        for ax in axes[row]:
            ax.set_axis_off()
    shown = sorted(names) if legend == "all" else sorted(k for k in present if k in names)
    handles = [Patch(facecolor=colours[k], edgecolor="black", linewidth=0.5, label=names[k]) for k in shown]
    if handles:
        figure.legend(
            handles=handles, loc="outside lower center", ncol=min(len(handles), 3), fontsize=8, frameon=False
        )
    _save(figure, save_path, dpi)
    return figure
