"""PyTorch LocAtViT: a ViT with Gaussian-augmented attention (GAug) and patch representation refinement (PRR).

Hajimiri et al., "Locality-Attending Vision Transformer", ICLR 2026. Every formula here is SPEC §2-5.
"""

import functools
import math
import threading
from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from transformers import initialization as init
from transformers.activations import ACT2FN, GELUActivation
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
    SemanticSegmenterOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_locatvit import LocAtViTConfig
from .cpu_attention_locatvit import fused_cpu_attention, fused_cpu_profiles, gaussian_profiles

NUM_PREFIX_TOKENS = 1  # the CLS token
# Profile values below this are set to 0, so that the product of two profiles is 0 or a normal float32: the bias then
# holds no subnormal numbers, which x86 CPUs multiply and add about 100x slower (a trained model's narrow Gaussians
# reach them on every far key). It changes a bias entry by less than 1e-37.
PROFILE_FLOOR = 2.0**-62
FLUSH_CLAMP = math.log(PROFILE_FLOOR) - 1.0  # exp of it is below the floor, so clamped entries are flushed


def flushed_exp(exponent: torch.Tensor) -> torch.Tensor:
    """exp(exponent), set to 0 wherever it would not exceed `PROFILE_FLOOR`; in place outside compilation. The
    exponent is clamped first: on CPU, exp takes a slow path for very negative arguments (and -inf), ten to a
    hundred times slower. (With a gradient, `FlushedProfiles` does this.)"""
    if torch.compiler.is_compiling():  # the compiler fuses the three steps itself
        return F.threshold(exponent.clamp(min=FLUSH_CLAMP).exp(), PROFILE_FLOOR, 0.0)
    return flush_exp_(exponent.clamp_(min=FLUSH_CLAMP))


def flush_exp_(clamped: torch.Tensor) -> torch.Tensor:
    """In place: exp of an exponent clamped at `FLUSH_CLAMP`, with the values not above `PROFILE_FLOOR` set to 0."""
    return F.threshold_(clamped.exp_(), PROFILE_FLOOR, 0.0)


class FlushedProfiles(torch.autograd.Function):
    """Row and column profiles from their (..., 2, S, Q) exponent (`LocAtViTGaussianBias.profiles`) when a gradient
    is recorded: `flushed_exp` of it, returned as contiguous query-major row (..., Q, H) and column (..., Q, W)
    profiles, the layout the attention reads.

    Only those two are kept for backward, whose gradient is grad * profile (0 where flushed), written straight into
    the exponent's layout. Autograd through exp, unbind, transposes and copies would keep the exponential too and
    run twice as many passes over it.
    """

    @staticmethod
    def forward(ctx, exponent: torch.Tensor, height: int, width: int):
        profile = flush_exp_(exponent.clamp(min=FLUSH_CLAMP))
        row = profile[..., 0, :height, :].transpose(-1, -2).contiguous()
        col = profile[..., 1, :width, :].transpose(-1, -2).contiguous()
        ctx.save_for_backward(row, col)
        ctx.side = exponent.shape[-2]
        return row, col

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_row: torch.Tensor | None, grad_col: torch.Tensor | None):
        row, col = ctx.saved_tensors
        shape = (*row.shape[:-2], 2, ctx.side, row.shape[-2])
        padded = row.shape[-1] != ctx.side or col.shape[-1] != ctx.side  # a non-square grid's table padding: 0
        grad = row.new_zeros(shape) if padded else row.new_empty(shape)
        for index, (profile, grad_profile) in enumerate(((row, grad_row), (col, grad_col))):
            target = grad[..., index, : profile.shape[-1], :].transpose(-1, -2)
            if grad_profile is None:
                target.zero_()
            else:
                torch.mul(grad_profile, profile, out=target)
        return grad, None, None


# The image-segmentation pipeline checks model types against this list, which the Auto registration does not extend.
MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.setdefault("locatvit", "LocAtViTForSemanticSegmentation")


class LocAtViTPatchEmbeddings(nn.Module):
    """Cuts `pixel_values` into patches, padding the bottom and right with zeros up to a multiple of the patch size."""

    def __init__(self, config: LocAtViTConfig):
        super().__init__()
        self.num_channels = config.num_channels
        self.patch_size = tuple(config.patch_size)
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=self.patch_size, stride=self.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Returns the patch embeddings as a (batch, hidden, rows, columns) map."""
        height, width = pixel_values.shape[-2:]
        pad_h = -height % self.patch_size[0]
        pad_w = -width % self.patch_size[1]
        if pad_h or pad_w:
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
        return self.projection(pixel_values)


class LocAtViTEmbeddings(nn.Module):
    """CLS token + patch embeddings + learned absolute position embeddings (resampled for other grids, SPEC §4)."""

    def __init__(self, config: LocAtViTConfig):
        super().__init__()
        self.config = config
        self.grid_size = config.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, NUM_PREFIX_TOKENS + self.grid_size[0] * self.grid_size[1], config.hidden_size)
        )
        self.patch_embeddings = LocAtViTPatchEmbeddings(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """Position embeddings for `grid_size`: the patch part resampled bicubically with antialiasing (timm's
        `resample_abs_pos_embed`), the CLS part untouched."""
        if tuple(grid_size) == tuple(self.grid_size):
            return self.position_embeddings
        prefix = self.position_embeddings[:, :NUM_PREFIX_TOKENS]
        patch = self.position_embeddings[:, NUM_PREFIX_TOKENS:]
        dim = patch.shape[-1]
        patch = patch.float().reshape(1, *self.grid_size, dim).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=tuple(grid_size), mode="bicubic", antialias=True, align_corners=False)
        patch = patch.permute(0, 2, 3, 1).reshape(1, -1, dim).to(prefix.dtype)
        return torch.cat((prefix, patch), dim=1)

    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Returns the token sequence (CLS first) and the patch grid (rows, columns) it was cut into.
        `interpolate_pos_encoding=None` follows `config.interpolate_pos_encoding`."""
        check_pixel_values(pixel_values, self.config)
        if interpolate_pos_encoding is None:
            interpolate_pos_encoding = bool(self.config.interpolate_pos_encoding)
        patches = self.patch_embeddings(pixel_values.to(self.patch_embeddings.projection.weight.dtype))
        grid_size = (patches.shape[-2], patches.shape[-1])
        if not interpolate_pos_encoding and grid_size != tuple(self.grid_size):
            raise ValueError(
                f"Input image size {tuple(pixel_values.shape[-2:])} doesn't match the model's image size "
                f"{tuple(s * p for s, p in zip(self.grid_size, self.patch_embeddings.patch_size))}: resize the "
                "images, or pass `interpolate_pos_encoding=True` (or set it in the config) to resample the position "
                "embeddings for this size."
            )
        embeddings = patches.flatten(2).transpose(1, 2)
        cls_tokens = self.cls_token.expand(embeddings.shape[0], -1, -1)
        embeddings = torch.cat((cls_tokens, embeddings), dim=1)
        embeddings = embeddings + self.interpolate_pos_encoding(grid_size)
        return self.dropout(embeddings), grid_size


class SeparableBiasWriter(torch.autograd.Function):
    """Writes B[i, j] = row[i, r_j] * col[i, c_j] for patch queries i and keys j straight into the (B, heads, N, N)
    mask the attention reads, with zero rows and columns for the prefix tokens.

    Autograd through the formula would build the (B, heads, P, H, W) product, copy it into a padded buffer, and in
    backward read the mask gradient through strided views. Here the forward is one broadcast multiply into the mask's
    patch block, and the backward reduces the incoming gradient to the (B, heads, P, H) and (B, heads, P, W) profile
    gradients with batched matmuls over each (batch, head) slice, without copying it.
    """

    @staticmethod
    def forward(ctx, row: torch.Tensor, col: torch.Tensor, num_prefix: int, dtype: torch.dtype) -> torch.Tensor:
        batch, heads, num_patches, _ = row.shape
        seq_len = num_prefix + num_patches
        bias = new_bias_buffer((batch, heads, seq_len, seq_len), dtype, row.device)
        ctx.save_for_backward(row, col)
        ctx.num_prefix = num_prefix
        return write_separable_bias(bias, row, col, num_prefix)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_bias: torch.Tensor):
        row, col = ctx.saved_tensors
        num_prefix = ctx.num_prefix
        grad_row = row.new_empty(row.shape) if ctx.needs_input_grad[0] else None
        grad_col = col.new_empty(col.shape) if ctx.needs_input_grad[1] else None
        slices = row.shape[0] * row.shape[1]  # (batch, heads) flattened: views of the contiguous tensors

        def flat(tensor):
            return None if tensor is None else tensor.reshape(slices, *tensor.shape[2:])

        patch_block = grad_bias[:, :, num_prefix:, num_prefix:].to(row.dtype).flatten(0, 1)
        reduce_bias_gradient(patch_block, flat(row), flat(col), flat(grad_row), flat(grad_col))
        return grad_row, grad_col, None, None


@functools.lru_cache(maxsize=16)
def grid_distance_table(
    side: int, floor: float, scale: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Clamped -0.5 * squared distances between the lines (rows or columns) 0..side-1 of a grid, divided by the
    variances' `scale`: a symmetric (side, side) table, computed in float64 and rounded once to `dtype` (on CPU: not
    every accelerator has float64). Built outside inference mode, so that tables first made by an inference call also
    serve training."""
    with torch.inference_mode(False):
        positions = torch.arange(side, dtype=torch.float64)
        table = (-0.5 * (positions[:, None] - positions[None, :]) ** 2).clamp(min=floor) / scale
        return table.to(dtype).to(device)


@functools.lru_cache(maxsize=16)
def query_distance_tables(
    height: int, width: int, floor: float, scale: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """`grid_distance_table` from every patch (row-major) to each grid row and column, stacked as one (2, S, P)
    table, S = max(H, W): [0, r, i] to row r, [1, c, i] to column c (entries past H or W are padding, never read).
    Stacked so that both profiles come from one broadcast expression, and queries last, so that it runs over
    contiguous rows of queries (a grid's 14 rows or columns are too short for vectorized loops).

    Cached for the few grid sizes a run meets; shared by all layers, whose constants are the same."""
    with torch.inference_mode(False):
        table = grid_distance_table.__wrapped__(max(height, width), floor, scale, dtype, device)
        rows = torch.arange(height, device=device).repeat_interleave(width)
        cols = torch.arange(width, device=device).repeat(height)
        return torch.stack((table[:, rows], table[:, cols]))


def new_bias_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (..., N, N) bias with zero prefix rows and columns and an uninitialized patch block, for
    `write_separable_bias`. Its rows are padded to whole 64-byte lines, placed (on CPU) so that each row's patch
    columns start on a line: the bias is then written with aligned vector stores (1.7x faster at 512 px), and CUDA's
    memory-efficient attention takes it without first copying it to such a layout. Attention kernels read the
    padded rows through the stride."""
    *leading, rows, cols = shape
    per_line = max(1, 64 // torch.empty((), dtype=dtype).element_size())
    row_stride = -(-cols // per_line) * per_line
    offset = -NUM_PREFIX_TOKENS % per_line if torch.device(device).type == "cpu" else 0
    storage = torch.empty(offset + math.prod(leading) * rows * row_stride, dtype=dtype, device=device)
    return zero_prefix(storage[offset:].view(*leading, rows, row_stride)[..., :cols], NUM_PREFIX_TOKENS)


def zero_prefix(bias: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Zeroes the rows and columns of the prefix tokens of `bias` (..., N, N), which get no Gaussian bias."""
    bias[..., :num_prefix, :].zero_()
    bias[..., num_prefix:, :num_prefix].zero_()
    return bias


class BiasWorkspace:
    """The buffers that all layers of an encoder reuse for what no layer keeps after its attention ran.

    Without a gradient that is the (…, N, N) bias itself (`"bias"`, from `new_bias_buffer`) and the profiles'
    exponent it is computed from (`"profiles"`), or, from the fused CPU kernel, the profiles themselves (`"row
    profiles"`, `"column profiles"`); in training (`SeparableBiasAttention` on CPU, `EfficientBiasAttention`
    on CUDA) the bias of each chunk (`chunk_biases`), and on CPU the scores and their gradient of short sequences
    (`"scores"`, `"grad_scores"`, contiguous).
    Reused across layers and calls, they cost their writes only, not a fresh allocation per layer (on CPU, large
    allocations go back to the system when freed, and each reuse then pays a page fault per 4 KB). One set per
    thread, so concurrent calls do not share them. Consequence for forward hooks on `LocAtViTGaussianBias`: in
    inference its output is overwritten by the next layer; clone it to keep it. (With the fused CPU kernel, float32
    `sdpa` on CPU writes no bias and does not call that module at all, only its `patch_profiles`.)
    """

    def __init__(self):
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}

    def get(self, purpose: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (threading.get_ident(), purpose)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != device:
            self._buffers.pop(key, None)  # free the old one before allocating its replacement
            live = {t.ident for t in threading.enumerate()}
            self._buffers = {k: b for k, b in self._buffers.items() if k[0] in live}
            with torch.inference_mode(False):  # a normal tensor: inference calls and training steps may share it
                if purpose == "bias":
                    buffer = new_bias_buffer(shape, dtype, device)
                else:
                    buffer = torch.empty(shape, dtype=dtype, device=device)
                self._buffers[key] = buffer
        return buffer


class LocAtViTGaussianBias(nn.Module):
    """GAug (SPEC §2): an additive attention bias pulling each patch query towards its neighbours.

    For query patch i at grid position (r_i, c_i) and key patch j:
        B_ij = alpha_i * exp(d_row(i, j) / (var_i[0] + eps) + d_col(i, j) / (var_i[1] + eps)),
    with d = -0.5 * squared distance, and per-query variances `var_i` and strength `alpha_i` predicted from q_i by two
    tiny linear maps shared by all heads of the layer. The exponential factorizes into a row profile
    alpha_i * exp(d_row / (var_i[0] + eps)) over the H rows and a column profile exp(d_col / (var_i[1] + eps)) over
    the W columns: (H + W) exponentials per query instead of H * W, evaluated in float32, and their outer product
    is written once, in the attention's dtype, into the mask (`SeparableBiasWriter`).
    """

    def __init__(self, config: LocAtViTConfig):
        super().__init__()
        self.variance_proj = nn.Linear(config.head_dim, 2)
        self.strength_proj = nn.Linear(config.head_dim, 1)
        self.initial_grid = tuple(config.grid_size)
        side = max(self.initial_grid)
        self.max_variance = float(side**2)
        self.variance_shift = math.log(self.max_variance - 1) if self.max_variance > 2 else 0.0
        # eps keeps the division finite in float16, the clamp keeps exp's argument there: SPEC §2.
        eps = 0.1
        while 0.5 * (side - 1) ** 2 / eps**2 > 32500:
            eps *= 2
        self.eps = eps
        self.min_half_sq_distance = max(-0.5 * (side - 1) ** 2, -6550.0)
        # Only models configured at >= 32 patches a side use the original's pooled-query shortcut in training.
        self.pools_queries_in_training = min(self.initial_grid) >= 32
        # Set by the encoder: a buffer shared by its layers, reused when no gradient is recorded.
        self.workspace: BiasWorkspace | None = None

    def uses_workspace(self) -> bool:
        """Whether this call writes into the encoder's reused buffers: no gradient recorded, outside compilation."""
        return self.workspace is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def variance_scale(self, grid_size: tuple[int, int]) -> float:
        """The variances' upper bound: the configured grid's squared side, rescaled with the grid (SPEC §2)."""
        scale = self.max_variance
        if tuple(grid_size) != self.initial_grid:
            scale *= min(grid_size) / min(self.initial_grid)
        return scale

    def query_distances(self, grid_size: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """-0.5 * squared distances from each patch query (row-major) to every grid row and column, clamped as in the
        original and divided by `variance_scale`: a (2, max(H, W), P) table (`query_distance_tables`)."""
        args = (*grid_size, self.min_half_sq_distance, self.variance_scale(grid_size), dtype)
        if torch.compiler.is_compiling():
            return query_distance_tables.__wrapped__(*args, device)
        return query_distance_tables(*args, torch.device(device))

    def statistics(self, queries: torch.Tensor) -> torch.Tensor:
        """The variance (2: row, column) and strength (1) maps' outputs, before their activations, for `queries`
        (batch, heads, tokens, head_dim): a tokens-last (batch, heads, 3, tokens) view, in float32 (float64 for
        float64 queries), with the variance's shift included."""
        dtype = torch.promote_types(queries.dtype, torch.float32)
        with torch.autocast(device_type=queries.device.type, enabled=False):
            # Both maps in one matmul over the token-major layout the q projection wrote (no copy for its view), as
            # (3, head_dim) x (head_dim, batch * tokens * heads): twice as fast as the tall-and-thin product.
            weight = torch.cat((self.variance_proj.weight, self.strength_proj.weight)).to(dtype)
            bias = torch.cat((self.variance_proj.bias - self.variance_shift, self.strength_proj.bias)).to(dtype)
            batch, heads, tokens, head_dim = queries.shape
            token_major = queries.transpose(1, 2).reshape(-1, head_dim).to(dtype)
            projected = torch.addmm(bias[:, None], weight, token_major.t())
        return projected.view(3, batch, tokens, heads).permute(1, 3, 0, 2)

    def variance_and_strength(self, queries: torch.Tensor, grid_size: tuple[int, int]):
        """Variances (..., 2: row, column) and strengths (..., 1) of `queries` (batch, heads, tokens, head_dim), in
        float32 (float64 for float64 queries)."""
        projected = self.statistics(queries)
        with torch.autocast(device_type=queries.device.type, enabled=False):
            variance = torch.sigmoid(projected[..., :2, :]) * self.variance_scale(grid_size)
            strength = F.softplus(projected[..., 2:, :])
        return variance.transpose(-1, -2), strength.transpose(-1, -2)

    def profiles(
        self,
        statistics: torch.Tensor,
        distances: torch.Tensor,
        grid_size: tuple[int, int],
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row profiles alpha * exp(d_row / (var_row + eps)) (batch, heads, Q, H) and column profiles
        exp(d_col / (var_col + eps)) (batch, heads, Q, W) of Q queries, from their `statistics` (batch, heads, 3, Q)
        and their (2, S, Q) distance table (`query_distances`).

        Both come from one exponential of one broadcast quotient, computed queries last (`query_distance_tables`):
        with var = scale * sigmoid(v), d / (var + eps) = (d / scale) / (sigmoid(v) + eps / scale), the table holding
        d / scale; alpha is moved into the row's exponent as log(alpha). `out`, if given, holds that (..., 2, S, Q)
        exponent (no gradient). The column profiles are a contiguous copy (the bias write reads them along the grid's
        columns), the row profiles too when they need a gradient (`FlushedProfiles`), else a view.
        """
        height, width = grid_size
        with torch.autocast(device_type=statistics.device.type, enabled=False):
            denominator = torch.sigmoid(statistics[..., :2, :]) + self.eps / self.variance_scale(grid_size)
            exponent = torch.div(distances, denominator.unsqueeze(-2), out=out)
            # alpha below PROFILE_FLOOR only ever gives flushed entries; the clamp keeps log(alpha) finite.
            strength = F.softplus(statistics[..., 2, :])
            exponent.select(-3, 0).add_(torch.log(strength.clamp(min=PROFILE_FLOOR)).unsqueeze(-2))
            if exponent.requires_grad and not torch.compiler.is_compiling():
                return FlushedProfiles.apply(exponent, height, width)
            row, col = flushed_exp(exponent).unbind(-3)
        # Inference reads the row profiles as they are (a copy would cost more than it saves), the column profiles
        # contiguous; a non-square grid drops the table's padding.
        return row[..., :height, :].transpose(-1, -2), col[..., :width, :].transpose(-1, -2).contiguous()

    def patch_profiles(self, query: torch.Tensor, grid_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Row (batch, heads, P, H) and column (batch, heads, P, W) profiles of every patch query: the bias of patch
        query i and patch key j = (r, c) is row[i, r] * col[i, c]. Without a gradient (and with a workspace), they
        are (views of) reused buffers, valid until the next layer's call. On CPU in float32 the fused kernel's
        `gaussian_profiles_` computes them in one pass (and its backward their gradient), elsewhere `profiles`."""
        if self.training and self.pools_queries_in_training:
            return self._pooled_profiles(query[:, :, NUM_PREFIX_TOKENS:], grid_size)
        statistics = self.statistics(query)[..., NUM_PREFIX_TOKENS:]
        batch, heads, seq_len, _ = query.shape
        patches, (height, width) = seq_len - NUM_PREFIX_TOKENS, grid_size
        on_cpu = statistics.device.type == "cpu" and statistics.dtype == torch.float32
        write_profiles = fused_cpu_profiles() if on_cpu and not torch.compiler.is_compiling() else None
        if write_profiles is not None:
            scale = self.variance_scale(grid_size)
            distances = grid_distance_table(max(grid_size), self.min_half_sq_distance, scale, torch.float32, "cpu")
            constants = (distances, self.eps / scale, PROFILE_FLOOR, FLUSH_CLAMP)
            if not self.uses_workspace():  # with its gradient, if one is recorded
                return gaussian_profiles(statistics, *constants, height, width)
            row = self.workspace.get("row profiles", (batch, heads, patches, height), statistics.dtype, query.device)
            col = self.workspace.get("column profiles", (batch, heads, patches, width), statistics.dtype, query.device)
            write_profiles(row, col, statistics, *constants)
            return row, col
        distances = self.query_distances(grid_size, statistics.dtype, query.device)
        out = None
        if self.uses_workspace():
            shape = (batch, heads, *distances.shape[:2], patches)
            out = self.workspace.get("profiles", shape, statistics.dtype, query.device)
        return self.profiles(statistics, distances, grid_size, out)

    def forward(self, query: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """Full (batch, heads, N, N) bias in `query`'s dtype; rows and columns of the CLS token are 0."""
        row_profile, col_profile = self.patch_profiles(query, grid_size)
        if torch.compiler.is_compiling():  # the compiler fuses the formula itself
            patch_bias = (row_profile.unsqueeze(-1) * col_profile.unsqueeze(-2)).flatten(-2).to(query.dtype)
            return F.pad(patch_bias, (NUM_PREFIX_TOKENS, 0, NUM_PREFIX_TOKENS, 0))
        if self.uses_workspace():
            batch, heads, seq_len, _ = query.shape
            bias = self.workspace.get("bias", (batch, heads, seq_len, seq_len), query.dtype, query.device)
            return write_separable_bias(bias, row_profile, col_profile, NUM_PREFIX_TOKENS)
        return SeparableBiasWriter.apply(row_profile, col_profile, NUM_PREFIX_TOKENS, query.dtype)

    def _pooled_profiles(self, patch_queries: torch.Tensor, grid_size: tuple[int, int]):
        """Profiles of the original's training shortcut for large initial grids (`pooled_queries`), evaluated once
        per 2x2 block and shared by its four queries."""
        pooled, corners, block = self.pooled_queries(patch_queries, grid_size)
        statistics = self.statistics(pooled)
        distances = self.query_distances(grid_size, statistics.dtype, patch_queries.device)[..., corners]
        row_profile, col_profile = self.profiles(statistics, distances, grid_size)
        return row_profile[:, :, block], col_profile[:, :, block]

    def pooled_queries(self, patch_queries: torch.Tensor, grid_size: tuple[int, int]):
        """The original's training shortcut for large initial grids (SPEC §2): queries average-pooled over 2x2 patch
        blocks give one variance and strength per block, evaluated at the block's even corner (every second row and
        column) and repeated over the block. Returns the pooled queries (batch, heads, blocks, head_dim), the patch
        index of each block's corner, and the block of each patch."""
        batch, heads, _, dim = patch_queries.shape
        height, width = grid_size
        grid = patch_queries.reshape(batch * heads, height, width, dim).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(grid, kernel_size=2, stride=2, ceil_mode=True)
        pooled_h, pooled_w = pooled.shape[-2:]
        pooled = pooled.permute(0, 2, 3, 1).reshape(batch, heads, pooled_h * pooled_w, dim)
        device = patch_queries.device
        block = (torch.arange(height, device=device) // 2)[:, None] * pooled_w + torch.arange(
            width, device=device
        ) // 2
        corners = (torch.arange(pooled_h, device=device) * 2)[:, None] * width + torch.arange(
            pooled_w, device=device
        ) * 2
        return pooled, corners.flatten(), block.flatten()

    def score_mod(self, query: torch.Tensor, grid_size: tuple[int, int]) -> Callable:
        """A `flex_attention` score modification that adds the bias inside the kernel, evaluating the Gaussian from
        the per-query variances and strengths: nothing of size N x N is materialized (for long sequences)."""
        height, width = grid_size
        device = query.device
        if self.training and self.pools_queries_in_training:
            pooled, corners, block = self.pooled_queries(query[:, :, NUM_PREFIX_TOKENS:], grid_size)
            variance, strength = self.variance_and_strength(pooled, grid_size)
            variance, strength, positions = variance[:, :, block], strength[:, :, block], corners[block]
        else:
            variance, strength = self.variance_and_strength(query, grid_size)
            variance = variance[:, :, NUM_PREFIX_TOKENS:]
            strength = strength[:, :, NUM_PREFIX_TOKENS:]
            positions = torch.arange(height * width, device=device)
        query_rows, query_cols = positions // width, positions % width
        inverse_row = 1 / (variance[..., 0] + self.eps)
        inverse_col = 1 / (variance[..., 1] + self.eps)
        strength = strength[..., 0]
        floor = self.min_half_sq_distance

        def gaussian_score_mod(score, batch, head, q_idx, kv_idx):
            q = (q_idx - NUM_PREFIX_TOKENS).clamp(min=0)
            k = (kv_idx - NUM_PREFIX_TOKENS).clamp(min=0)
            row_offset = (query_rows[q] - k // width).to(inverse_row.dtype)
            col_offset = (query_cols[q] - k % width).to(inverse_row.dtype)
            d_row = torch.clamp(-0.5 * row_offset * row_offset, min=floor)
            d_col = torch.clamp(-0.5 * col_offset * col_offset, min=floor)
            exponent = d_row * inverse_row[batch, head, q] + d_col * inverse_col[batch, head, q]
            bias = strength[batch, head, q] * torch.exp(exponent)
            is_patch_pair = (q_idx >= NUM_PREFIX_TOKENS) & (kv_idx >= NUM_PREFIX_TOKENS)
            return score + torch.where(is_patch_pair, bias, torch.zeros_like(bias)).to(score.dtype)

        return gaussian_score_mod


def flex_attention_forward(
    module: nn.Module, query, key, value, score_mod: Callable | None, scaling: float, dropout: float = 0.0
):
    """Attention through `flex_attention`, compiled (the fused kernel), with the Gaussian as `score_mod`."""
    if dropout > 0:
        raise ValueError(
            "`flex_attention` does not support attention dropout: set `attention_probs_dropout_prob=0` or use "
            "`attn_implementation='sdpa'`."
        )
    if torch.compiler.is_compiling():  # inside a compiled model, the compiler fuses it
        from torch.nn.attention.flex_attention import flex_attention
    else:
        flex_attention = compiled_flex_attention()
    output = flex_attention(query, key, value, score_mod=score_mod, scale=scaling)
    return output.transpose(1, 2).contiguous(), None


@functools.cache
def compiled_flex_attention() -> Callable:
    """`flex_attention` compiled once per shape. Static shapes: inductor's CPU template miscompiles dynamic ones
    (torch 2.14), and a vision model sees few distinct grid sizes."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def write_separable_bias(bias: torch.Tensor, row: torch.Tensor, col: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Writes row[..., i, r_j] * col[..., i, c_j] into the patch block of `bias` (..., N, N), whose prefix rows and
    columns must be 0 (`new_bias_buffer`, `zero_prefix`)."""
    patch_block = bias[..., num_prefix:, num_prefix:].unflatten(-1, (row.shape[-1], col.shape[-1]))
    torch.mul(row.unsqueeze(-1), col.unsqueeze(-2), out=patch_block)
    return bias


def reduce_bias_gradient(grad: torch.Tensor, row: torch.Tensor, col: torch.Tensor, grad_row, grad_col) -> None:
    """Gradients of patch blocks (n, P, P) of the bias with respect to their (n, P, H) row and (n, P, W) column
    profiles, written into `grad_row` and `grad_col` (either may be None). Both are batched matrix-vector products
    over the P queries: on small grids (and on accelerators) one copy of the block makes them a single batched call;
    on large grids on CPU the strided block (P, H, W), strides (N, W, 1), is read in place, one slice at a time
    (measured faster there)."""
    slices, num_patches, height = row.shape
    width = col.shape[-1]
    if num_patches <= 256 or grad.device.type != "cpu":
        grid = grad.reshape(slices * num_patches, height, width)
        if grad_row is not None:
            grad_row.copy_(torch.bmm(grid, col.reshape(-1, width, 1)).view_as(grad_row))
        if grad_col is not None:
            grad_col.copy_(torch.bmm(row.reshape(-1, 1, height), grid).view_as(grad_col))
        return
    for index in range(slices):
        grid = grad[index].unflatten(-1, (height, width))
        if grad_row is not None:
            torch.bmm(grid, col[index].unsqueeze(-1), out=grad_row[index].unsqueeze(-1))
        if grad_col is not None:
            torch.bmm(row[index].unsqueeze(-2), grid, out=grad_col[index].unsqueeze(-2))


# Above this many bytes, the inference bias is written and attended in equal blocks of queries
# (`attention_in_query_blocks`): the whole (batch, heads, N, N) bias of a Tiny model takes 201 MB at 1024 px and
# 3.2 GB at 2048 px. Below, it is written in one piece: blocks cost time (measured on CPU, Tiny, 1024 px: two blocks
# about the same time as one piece, peak memory 141 instead of 238 MB; four blocks 15% slower).
INFERENCE_BIAS_BYTES = 128 * 2**20


def bias_bytes(query: torch.Tensor) -> int:
    """Size of the (batch, heads, N, N) bias of `query` (batch, heads, N, head_dim), in its dtype."""
    batch, heads, seq_len, _ = query.shape
    return batch * heads * seq_len * seq_len * query.element_size()


def attention_in_query_blocks(query, key, value, row, col, scale: float, workspace: "BiasWorkspace") -> torch.Tensor:
    """`sdpa` with the separable bias, without a gradient, for long sequences: the bias rows of a block of queries
    are written into one reused buffer and attended at once, so that the bias never takes much more than
    `INFERENCE_BIAS_BYTES`. Returns (batch, N, heads, dim), as the attention interface does."""
    batch, heads, seq_len, dim = query.shape
    prefix = NUM_PREFIX_TOKENS
    blocks = -(-bias_bytes(query) // INFERENCE_BIAS_BYTES)
    block = max(prefix, -(-seq_len // blocks))  # equal blocks: a short last one would waste a kernel call
    # `prefix` rows more than a block: the first block's prefix (CLS) queries get the zero rows on top; later blocks
    # write below them, so that `write_separable_bias`, which skips the prefix rows, serves every block.
    buffer = workspace.get("bias", (batch, heads, block + prefix, seq_len), query.dtype, query.device)
    output = query.new_empty(batch, seq_len, heads, dim)
    for start in range(0, seq_len, block):
        stop = min(start + block, seq_len)
        above = 0 if start == 0 else prefix  # rows of the buffer above this block's first query
        rows = buffer[:, :, : above + stop - start]
        patches = slice(max(start - prefix, 0), stop - prefix)
        write_separable_bias(rows, row[:, :, patches], col[:, :, patches], prefix)
        block_output = F.scaled_dot_product_attention(
            query[:, :, start:stop], key, value, attn_mask=rows[:, :, above:], scale=scale
        )
        output[:, start:stop] = block_output.transpose(1, 2)
    return output


# Working memory of `SeparableBiasAttention`: (N x N) slices are processed this many bytes at a time.
SLAB_BYTES = 16 * 2**20


def attention_chunks(batch: int, heads: int, seq_len: int, element_size: int) -> list[tuple[slice, slice]]:
    """(batch, heads) blocks whose (N, N) maps take about `SLAB_BYTES` together: whole images while one fits, else
    groups of heads of one image (at least one head)."""
    map_bytes = seq_len * seq_len * element_size
    items = SLAB_BYTES // (heads * map_bytes)
    if items >= 1:
        return [(slice(start, min(start + items, batch)), slice(0, heads)) for start in range(0, batch, items)]
    group = max(1, SLAB_BYTES // map_bytes)
    return [
        (slice(item, item + 1), slice(start, min(start + group, heads)))
        for item in range(batch)
        for start in range(0, heads, group)
    ]


# Sequences of at most this many tokens per head dimension keep their attention probabilities for the backward pass:
# (heads, N, N) per image then adds at most a quarter to a layer's saved activations (about 15 x N x hidden), and
# saves recomputing them. Longer sequences, whose probabilities grow with N^2, recompute them.
KEPT_PROBABILITY_TOKENS_PER_HEAD_DIM = 4


class SeparableBiasAttention(torch.autograd.Function):
    """softmax(q k^T * scale + B) v for a bias B given by its separable profiles, for training on CPU where the fused
    kernel (`cpu_attention_locatvit`, which does all of this inside the cache) is not built.

    PyTorch's CPU attention has a fused kernel for a float mask but not for the mask's gradient: with a mask that
    needs one, `sdpa` falls back to its unfused math path, which keeps the bias, the scores and the probabilities of
    every layer. Here short sequences (`KEPT_PROBABILITY_TOKENS_PER_HEAD_DIM`) compute the attention with batched
    matmuls and keep only the probabilities; long ones run the fused kernel, and the backward recomputes the bias
    from its profiles and the probabilities from the saved log-sum-exp, going through the batch in chunks of about
    `SLAB_BYTES`, so that nothing of size N x N outlives one chunk. Either way the bias gradient is reduced to the
    profiles at once.
    """

    @staticmethod
    def forward(ctx, query, key, value, row, col, scale: float, num_prefix: int, workspace: "BiasWorkspace"):
        batch, heads, seq_len, dim = query.shape
        ctx.scale, ctx.num_prefix, ctx.workspace = scale, num_prefix, workspace
        ctx.keeps_probabilities = seq_len <= KEPT_PROBABILITY_TOKENS_PER_HEAD_DIM * dim
        if ctx.keeps_probabilities:
            slices = batch * heads
            q, k, v = (tensor.reshape(slices, seq_len, dim) for tensor in (query, key, value))
            scores = zero_prefix(workspace.get("scores", (slices, seq_len, seq_len), q.dtype, q.device), num_prefix)
            write_separable_bias(scores, row.flatten(0, 1), col.flatten(0, 1), num_prefix)
            probabilities = scores.baddbmm_(q, k.transpose(1, 2), alpha=scale).softmax(dim=-1)
            output = torch.bmm(probabilities, v)
            ctx.save_for_backward(q, k, v, row, col, output, probabilities)
            return output.view(batch, heads, seq_len, dim)
        output = query.new_empty(batch, heads, seq_len, dim)
        logsumexp = query.new_empty(batch, heads, seq_len)
        for chunk, bias in chunk_biases(workspace, query, row, col, num_prefix):
            output[chunk], logsumexp[chunk] = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query[chunk], key[chunk], value[chunk], 0.0, False, attn_mask=bias, scale=scale
            )
        ctx.save_for_backward(query, key, value, row, col, output, logsumexp)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        query, key, value, row, col, output, saved = ctx.saved_tensors
        batch, heads = row.shape[:2]
        grad_row = row.new_empty(row.shape) if ctx.needs_input_grad[3] else None
        grad_col = col.new_empty(col.shape) if ctx.needs_input_grad[4] else None
        if ctx.keeps_probabilities:  # query, key, value, output: (batch * heads, N, dim); saved: probabilities
            grad_o = grad_output.reshape(output.shape)
            grads = [torch.empty_like(t) for t in (query, key, value)]
            slices, seq_len = saved.shape[:2]
            attention_backward_slices(
                saved,
                ctx.workspace.get("grad_scores", (slices, seq_len, seq_len), query.dtype, query.device),
                query,
                key,
                value,
                grad_o,
                (grad_o * output).sum(-1, keepdim=True),
                ctx,
                grads,
                row.flatten(0, 1),
                col.flatten(0, 1),
                None if grad_row is None else grad_row.flatten(0, 1),
                None if grad_col is None else grad_col.flatten(0, 1),
            )
            return *(grad.view(batch, heads, *grad.shape[1:]) for grad in grads), grad_row, grad_col, None, None, None
        seq_len = query.shape[-2]
        # Contiguous gradients, whatever the inputs' layout: the chunks below write into views of them.
        grads = [query.new_empty(t.shape) for t in (query, key, value)]
        # D_i = sum_j P_ij dP_ij = dO_i . O_i, the softmax backward's row term.
        delta = (grad_output * output).sum(-1, keepdim=True)
        for chunk in attention_chunks(batch, heads, seq_len, query.element_size()):
            flat = functools.partial(flat_chunk, chunk=chunk)
            q, k, rows, cols = flat(query), flat(key), flat(row), flat(col)
            # Fresh buffers, unlike the short sequences' reused ones: up to 2 x SLAB_BYTES that are not kept between
            # steps (no measurable time or peak-memory difference at 512 px, batch 4).
            probabilities = zero_prefix(q.new_empty(q.shape[0], seq_len, seq_len), ctx.num_prefix)
            write_separable_bias(probabilities, rows, cols, ctx.num_prefix)
            probabilities.baddbmm_(q, k.transpose(1, 2), alpha=ctx.scale)
            probabilities.sub_(flat(saved.unsqueeze(-1))).exp_()
            attention_backward_slices(
                probabilities, torch.empty_like(probabilities), q, k, flat(value), flat(grad_output), flat(delta), ctx,
                [flat(grad) for grad in grads], rows, cols, flat(grad_row), flat(grad_col),
            )  # fmt: skip
        return *grads, grad_row, grad_col, None, None, None


class EfficientBiasAttention(torch.autograd.Function):
    """softmax(q k^T * scale + B) v for a bias B given by its separable profiles, for training on CUDA.

    `sdpa` with a mask that needs a gradient keeps every layer's (batch, heads, N, N) mask for the backward pass
    (50 MB a layer for Tiny at 512 px, batch 4: twice a ViT's training memory) and returns the mask's whole
    gradient. Here CUDA's memory-efficient kernel is called directly, in chunks of about `SLAB_BYTES`
    (`attention_chunks`): the forward writes each chunk's bias into one reused buffer, the backward writes it
    again from the profiles and reduces its gradient to the profiles at once. Only the profiles and the kernel's
    log-sum-exp are kept, as for a plain ViT's attention.
    """

    @staticmethod
    def forward(ctx, query, key, value, row, col, scale: float, num_prefix: int, workspace: "BiasWorkspace"):
        batch, heads, seq_len, dim = query.shape
        ctx.scale, ctx.num_prefix, ctx.workspace = scale, num_prefix, workspace
        output = query.new_empty(batch, seq_len, heads, dim).transpose(1, 2)  # the layout the kernel writes
        logsumexp = None
        for chunk, bias in chunk_biases(workspace, query, row, col, num_prefix):
            chunk_output, chunk_logsumexp, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
                query[chunk], key[chunk], value[chunk], bias, True, scale=scale
            )
            if logsumexp is None:  # padded by the kernel to whole blocks of queries
                logsumexp = chunk_logsumexp.new_empty(batch, heads, chunk_logsumexp.shape[-1])
            output[chunk], logsumexp[chunk] = chunk_output, chunk_logsumexp
        ctx.save_for_backward(query, key, value, row, col, output, logsumexp, seed, offset)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        query, key, value, row, col, output, logsumexp, seed, offset = ctx.saved_tensors
        batch, heads, seq_len, dim = query.shape
        prefix = ctx.num_prefix
        grads = [query.new_empty(batch, seq_len, heads, dim).transpose(1, 2) for _ in range(3)]
        grad_row = row.new_empty(row.shape) if ctx.needs_input_grad[3] else None
        grad_col = col.new_empty(col.shape) if ctx.needs_input_grad[4] else None
        needs_bias_grad = grad_row is not None or grad_col is not None
        for chunk, bias in chunk_biases(ctx.workspace, query, row, col, prefix):
            *chunk_grads, grad_bias = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
                grad_output[chunk], query[chunk], key[chunk], value[chunk], bias, output[chunk], logsumexp[chunk],
                seed, offset, 0.0, [True, True, True, needs_bias_grad], False, scale=ctx.scale,
            )  # fmt: skip
            for grad, chunk_grad in zip(grads, chunk_grads):
                grad[chunk] = chunk_grad
            if needs_bias_grad:
                patch_block = grad_bias[:, :, prefix:, prefix:].to(row.dtype).flatten(0, 1)
                profiles = (flat_chunk(tensor, chunk) for tensor in (row, col, grad_row, grad_col))
                reduce_bias_gradient(patch_block, *profiles)
        return *grads, grad_row, grad_col, None, None, None


def flat_chunk(tensor: torch.Tensor | None, chunk) -> torch.Tensor | None:
    """One `attention_chunks` chunk of a (batch, heads, ...) tensor as (slices, ...). Of a contiguous tensor it is a
    view, since a chunk (whole images, or heads of one image) is one contiguous block: the gradients written into
    it land in `tensor`."""
    return None if tensor is None else tensor[chunk].flatten(0, 1)


def chunk_biases(workspace: "BiasWorkspace", query: torch.Tensor, row, col, num_prefix: int):
    """Each (batch, heads) chunk of `attention_chunks` with its bias, written in turn into one reused workspace
    buffer, sized for the first (largest) chunk."""
    batch, heads, seq_len, _ = query.shape
    chunks = attention_chunks(batch, heads, seq_len, query.element_size())
    items, group = (part.stop - part.start for part in chunks[0])
    buffer = workspace.get("bias", (items, group, seq_len, seq_len), query.dtype, query.device)
    for chunk in chunks:
        bias = buffer[: chunk[0].stop - chunk[0].start, : chunk[1].stop - chunk[1].start]
        yield chunk, write_separable_bias(bias, row[chunk], col[chunk], num_prefix)


def attention_backward_slices(
    probabilities, grad_scores, q, k, v, grad_o, delta, ctx, grads, rows, cols, grad_rows, grad_cols
) -> None:
    """Gradients of softmax(q k^T * scale + B) v for (slices, N, ...) tensors, given the probabilities and the
    softmax backward's row term `delta`: into `grads` (for q, k, v) and the profile gradients (either may be None).
    `grad_scores`: an (slices, N, N) buffer to work in."""
    grad_q, grad_k, grad_v = grads
    torch.bmm(probabilities.transpose(1, 2), grad_o, out=grad_v)
    torch.bmm(grad_o, v.transpose(1, 2), out=grad_scores)
    grad_scores.sub_(delta).mul_(probabilities)  # dS = P * (dP - D): also the bias gradient
    # beta=0: the outputs' old contents are ignored; the scale rides on the matmul (alpha)
    torch.baddbmm(grad_q, grad_scores, k, beta=0.0, alpha=ctx.scale, out=grad_q)
    torch.baddbmm(grad_k, grad_scores.transpose(1, 2), q, beta=0.0, alpha=ctx.scale, out=grad_k)
    prefix = ctx.num_prefix
    reduce_bias_gradient(grad_scores[:, prefix:, prefix:], rows, cols, grad_rows, grad_cols)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class LocAtViTAttention(nn.Module):
    """Multi-head self-attention whose logits get the Gaussian bias, passed to the attention interface as mask."""

    def __init__(self, config: LocAtViTConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        inner = config.num_attention_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=config.qkv_bias)
        self.o_proj = nn.Linear(inner, config.hidden_size)
        self.gaussian_bias = LocAtViTGaussianBias(config) if config.use_gaussian_attention else None

    def forward(
        self, hidden_states: torch.Tensor, grid_size: tuple[int, int], **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        dropout = self.attention_dropout if self.training else 0.0
        implementation = self.config._attn_implementation
        if implementation == "flex_attention":
            score_mod = self.gaussian_bias.score_mod(query, grid_size) if self.gaussian_bias is not None else None
            attn_output, attn_weights = flex_attention_forward(
                self, query, key, value, score_mod, self.scaling, dropout
            )
            return self.o_proj(attn_output.reshape(*input_shape, -1)), attn_weights

        if self.gaussian_bias is not None and self.uses_fused_cpu_kernel(query, dropout):
            row, col = self.gaussian_bias.patch_profiles(query, grid_size)
            attn_output = fused_cpu_attention()(query, key, value, row, col, self.scaling, NUM_PREFIX_TOKENS)
            return self.o_proj(attn_output.reshape(*input_shape, -1)), None

        if self.gaussian_bias is not None and self.recomputes_bias_in_backward(query, dropout):
            row, col = self.gaussian_bias.patch_profiles(query, grid_size)
            attention = EfficientBiasAttention if query.device.type == "cuda" else SeparableBiasAttention
            attn_output = attention.apply(
                query, key, value, row, col, self.scaling, NUM_PREFIX_TOKENS, self.gaussian_bias.workspace
            )
            return self.o_proj(attn_output.transpose(1, 2).reshape(*input_shape, -1)), None

        if self.gaussian_bias is not None and self.attends_in_query_blocks(query):
            row, col = self.gaussian_bias.patch_profiles(query, grid_size)
            attn_output = attention_in_query_blocks(
                query, key, value, row, col, self.scaling, self.gaussian_bias.workspace
            )
            return self.o_proj(attn_output.reshape(*input_shape, -1)), None

        bias = self.gaussian_bias(query, grid_size) if self.gaussian_bias is not None else None
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            bias,
            dropout=dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights

    def uses_fused_cpu_kernel(self, query: torch.Tensor, dropout: float) -> bool:
        """`sdpa` in float32 on CPU, inference and training, where the fused kernel (`cpu_attention_locatvit`) is
        built: it evaluates the bias inside the attention instead of writing and reading an N x N mask."""
        return (
            query.device.type == "cpu"
            and query.dtype == torch.float32
            and dropout == 0.0
            and self.config._attn_implementation == "sdpa"
            and not torch.compiler.is_compiling()
            and fused_cpu_attention() is not None
        )

    def attends_in_query_blocks(self, query: torch.Tensor) -> bool:
        """`sdpa` without a gradient, with a bias above `INFERENCE_BIAS_BYTES`: `attention_in_query_blocks`."""
        return (
            self.gaussian_bias.uses_workspace()
            and bias_bytes(query) > INFERENCE_BIAS_BYTES
            and self.config._attn_implementation == "sdpa"
        )

    def recomputes_bias_in_backward(self, query: torch.Tensor, dropout: float) -> bool:
        """Training with `sdpa` on CPU in float32 without the fused kernel (`SeparableBiasAttention`), or on CUDA
        where its memory-efficient kernel is enabled and takes the head size (`EfficientBiasAttention`): see there
        why."""
        if not (torch.is_grad_enabled() and query.requires_grad and dropout == 0.0):  # first: inference is done here
            return False
        if (
            self.config._attn_implementation != "sdpa"
            or self.gaussian_bias.workspace is None
            or torch.compiler.is_compiling()
        ):
            return False
        if query.device.type == "cpu":
            return query.dtype == torch.float32
        return (
            query.device.type == "cuda"
            and query.dtype in (torch.float32, torch.float16, torch.bfloat16)  # the kernel's types
            and torch.backends.cuda.mem_efficient_sdp_enabled()
            and query.shape[-1] % 8 == 0
        )


class LocAtViTMLP(nn.Module):
    """fc1 -> activation -> fc2, with the activation in place on fc1's output where nothing else can read it.

    Same values either way; in place, inference allocates one (tokens, intermediate) buffer less per layer, which
    the allocator would otherwise map, fault in and return every layer (Tiny, 224 px, batch 16: 9 MB a layer; the
    CPU forward 10% faster with glibc's default allocator, 3% without page faults, where the activation stays in
    the cache).
    """

    def __init__(self, config: LocAtViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        if self.activates_in_place(hidden_states):
            return self.fc2(torch.ops.aten.gelu_(hidden_states))
        return self.fc2(self.activation_fn(hidden_states))

    def activates_in_place(self, fc1_output: torch.Tensor) -> bool:
        """Exact GELU (the default `hidden_act`) on an output of fc1 that nothing else reads (`may_overwrite`)."""
        return (
            isinstance(self.activation_fn, GELUActivation)
            and self.activation_fn.act is F.gelu
            and may_overwrite(fc1_output, self.fc1)
        )


def may_overwrite(output: torch.Tensor, *producers: nn.Module) -> bool:
    """Whether `output`, fresh from `producers`, may be overwritten: autograd does not record it, and no forward hook
    (a producer's own or a global one, `register_module_forward_hook`) can hold it, as interpretability hooks do.
    The hooks are read from torch's registries, which have no public accessor; if the global one moves, assume
    there are hooks."""
    global_hooks = getattr(nn.modules.module, "_global_forward_hooks", None)
    if output.requires_grad or global_hooks is None or global_hooks:
        return False
    return not any(module._forward_hooks for module in producers)


class LocAtViTDropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = hidden_states.new_empty(shape).bernoulli_(keep_prob)
        return hidden_states * mask / keep_prob

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class LocAtViTLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block (timm's `Block`)."""

    def __init__(self, config: LocAtViTConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = LocAtViTAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = LocAtViTMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path = LocAtViTDropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(
        self, hidden_states: torch.Tensor, grid_size: tuple[int, int], **kwargs: Unpack[TransformersKwargs]
    ) -> torch.Tensor:
        attn_output, _ = self.attention(self.layernorm_before(hidden_states), grid_size, **kwargs)
        hidden_states = self.add_branch(hidden_states, attn_output, self.attention, self.attention.o_proj)
        mlp_output = self.mlp(self.layernorm_after(hidden_states))
        return self.add_branch(hidden_states, mlp_output, self.mlp, self.mlp.fc2)

    def add_branch(self, residual: torch.Tensor, branch_output: torch.Tensor, *producers: nn.Module) -> torch.Tensor:
        """residual + drop_path(dropout(branch_output)), summed into the branch's fresh output where nothing else
        can read it (no autograd, no forward hook on the modules that returned it) and where the sum keeps its type
        (under autocast the branch is in half precision, the residual stream in float32): one buffer less per sum,
        as for `LocAtViTMLP`'s activation. The residual itself, a recorded hidden state, is never written."""
        branch = self.drop_path(self.dropout(branch_output))
        if (branch.dtype, branch.shape) == (residual.dtype, residual.shape) and may_overwrite(
            branch, *producers, self.dropout, self.drop_path
        ):
            return branch.add_(residual)
        return residual + branch


class LocAtViTEncoder(nn.Module):
    def __init__(self, config: LocAtViTConfig, num_layers: int | None = None):
        """The first `num_layers` of the configured blocks (default: all), with the configured depth's drop-path
        rates."""
        super().__init__()
        depth = config.num_hidden_layers
        rates = [config.drop_path_rate * index / max(depth - 1, 1) for index in range(depth)]  # timm's linspace
        self.layers = nn.ModuleList([LocAtViTLayer(config, rate) for rate in rates[:num_layers]])
        self.bias_workspace = BiasWorkspace()
        for layer in self.layers:
            if layer.attention.gaussian_bias is not None:
                layer.attention.gaussian_bias.workspace = self.bias_workspace

    def forward(
        self, hidden_states: torch.Tensor, grid_size: tuple[int, int], **kwargs: Unpack[TransformersKwargs]
    ) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, grid_size, **kwargs)
        return hidden_states


class LocAtViTPatchRefinement(nn.Module):
    """PRR (SPEC §3): parameter-free multi-head self-attention of the normed tokens with themselves.

    No projections, no residual: softmax(x_h x_h^T / sqrt(C / heads)) x_h per head. It routes the classification
    gradient through every patch position, which is what makes the patch outputs meaningful.
    """

    def __init__(self, config: LocAtViTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads

    def forward(self, hidden_states: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        """Refines the first `num_queries` tokens (default: all), each attending to every token: the classifier reads
        only the CLS token, whose refinement alone costs one query's attention instead of N."""
        batch, seq_len, channels = hidden_states.shape
        heads = hidden_states.view(batch, seq_len, self.num_heads, channels // self.num_heads).transpose(1, 2)
        queries = heads if num_queries is None else heads[:, :, :num_queries]
        refined = F.scaled_dot_product_attention(queries, heads, heads)
        return refined.transpose(1, 2).reshape(batch, queries.shape[2], channels)


def check_pixel_values(pixel_values: torch.Tensor | None, config: LocAtViTConfig) -> None:
    """Rejects inputs the model would otherwise misread, naming the problem and the fix."""
    if pixel_values is None:
        raise ValueError("`pixel_values` is required: pass a (batch, channels, height, width) float tensor.")
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"`pixel_values` must be a torch.Tensor, got {type(pixel_values).__name__}.")
    if pixel_values.ndim != 4:
        raise ValueError(
            f"`pixel_values` must have 4 dimensions (batch, channels, height, width), got shape "
            f"{tuple(pixel_values.shape)}: add a batch dimension with `unsqueeze(0)` or stack the images."
        )
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"`pixel_values` must be a floating-point tensor, got {pixel_values.dtype}: normalize the images with the "
            "image processor (or convert them with `.float()`)."
        )
    if pixel_values.shape[0] == 0:
        raise ValueError("`pixel_values` is an empty batch: pass at least one image.")
    if pixel_values.shape[1] != config.num_channels:
        raise ValueError(
            f"`pixel_values` has {pixel_values.shape[1]} channels but the model expects {config.num_channels}: "
            "convert the images (e.g. to RGB) or set `num_channels` in the config."
        )
    height, width = pixel_values.shape[-2:]
    if height < config.patch_size[0] or width < config.patch_size[1]:
        raise ValueError(
            f"Images of {height}x{width} pixels are smaller than one {config.patch_size[0]}x{config.patch_size[1]} "
            "patch: resize them to at least one patch."
        )


@auto_docstring
class LocAtViTPreTrainedModel(PreTrainedModel):
    config: LocAtViTConfig
    base_model_prefix = "locatvit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["LocAtViTEmbeddings", "LocAtViTLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": LocAtViTLayer, "attentions": LocAtViTAttention}
    # Whether inputs of another size than the config's are taken (position embeddings resampled) when neither the
    # call nor the config says: dense task models see whole images of any size, as DINOv2's do.
    interpolates_by_default = False

    def interpolates(self, interpolate_pos_encoding: bool | None) -> bool:
        """`interpolate_pos_encoding` of a call: the argument, else the config's, else the model's default."""
        for choice in (interpolate_pos_encoding, self.config.interpolate_pos_encoding):
            if choice is not None:
                return bool(choice)
        return self.interpolates_by_default

    def _init_weights(self, module):
        """timm's ViT initialization (SPEC §6): truncated normal 0.02 for Linear weights and the position embedding,
        normal 1e-6 for the CLS token, PyTorch's defaults for the patch-embedding conv and the norms. The 1x1 convs of
        the segmentation head are linear maps and start like the Linear layers."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):  # the patch projection: PyTorch's default (kaiming-uniform, a=sqrt(5))
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, LocAtViTEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            init.normal_(module.cls_token, mean=0.0, std=1e-6)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)


@auto_docstring
class LocAtViTModel(LocAtViTPreTrainedModel):
    def __init__(self, config: LocAtViTConfig, add_final_norm: bool = True):
        r"""
        add_final_norm (`bool`, *optional*, defaults to `True`):
            Whether to hold the final LayerNorm. A task model whose loss never reads it (segmentation, which reads the
            last block) leaves it out, so that every parameter it holds gets a gradient, as distributed training
            with `find_unused_parameters=False` requires.
        """
        super().__init__(config)
        self.embeddings = LocAtViTEmbeddings(config)
        self.encoder = LocAtViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if add_final_norm else None
        self.refinement = LocAtViTPatchRefinement(config) if config.use_patch_refinement else None
        self.post_init()

    def get_input_embeddings(self) -> LocAtViTPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def final_norm(self, last_block: torch.Tensor) -> torch.Tensor:
        return last_block if self.layernorm is None else self.layernorm(last_block)

    def forward_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = None, **kwargs
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Output of the last block (before the final norm and PRR) and the patch grid it lies on."""
        embeddings, grid_size = self.embeddings(pixel_values, self.interpolates(interpolate_pos_encoding))
        return self.encoder(embeddings, grid_size, **kwargs), grid_size

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        r"""
        Returns `last_hidden_state` = PRR(LayerNorm(last block)) (LayerNorm only when PRR is off), `pooler_output` =
        its CLS token, and with `output_hidden_states` the embeddings and every block's output (before the norm).
        """
        last_block, _ = self.forward_features(pixel_values, interpolate_pos_encoding, **kwargs)
        sequence_output = self.final_norm(last_block)
        if self.refinement is not None:
            sequence_output = self.refinement(sequence_output)
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=sequence_output[:, 0])

    def pool(self, last_block: torch.Tensor) -> torch.Tensor:
        """`pooler_output` from the last block's output: the CLS token of PRR(LayerNorm(last block)), refined alone
        (PRR of the N - 1 patch tokens, which no classifier reads, is most of PRR's cost)."""
        sequence_output = self.final_norm(last_block)
        if self.refinement is None:
            return sequence_output[:, 0]
        return self.refinement(sequence_output, num_queries=1)[:, 0]


@auto_docstring(
    custom_intro="""
    LocAtViT with a linear classifier on the CLS token of the refined output (SPEC §3), e.g. for ImageNet.
    """
)
class LocAtViTForImageClassification(LocAtViTPreTrainedModel):
    def __init__(self, config: LocAtViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.locatvit = LocAtViTModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices in `[0, config.num_labels)` (single-label), multi-hot floats of shape
            `(batch_size, num_labels)` (multi-label) or regression targets, as in `ViTForImageClassification`.
        """
        # Through `pool` rather than the base model's forward: only the CLS token is refined (hidden states and
        # attentions are recorded here, as they would be there).
        interpolate_pos_encoding = self.interpolates(interpolate_pos_encoding)
        last_block, _ = self.locatvit.forward_features(pixel_values, interpolate_pos_encoding, **kwargs)
        logits = self.classifier(self.locatvit.pool(last_block))
        loss = None
        if labels is not None:
            check_classification_labels(labels, logits, self.config)
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(loss=loss, logits=logits)


def label_values_are_free(labels: torch.Tensor) -> bool:
    """Whether reading the labels' values costs nothing: eager, on the CPU. On an accelerator it would wait for the
    device, and under `torch.compile` break the graph; there the loss's own checks (a device-side assert) remain."""
    return labels.device.type == "cpu" and not torch.compiler.is_compiling()


def check_classification_labels(labels: torch.Tensor, logits: torch.Tensor, config: LocAtViTConfig) -> None:
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"`labels` has {labels.shape[0]} entries for a batch of {logits.shape[0]} images: pass one label per image."
        )
    integer_labels = not labels.is_floating_point()
    if integer_labels and config.num_labels > 1 and labels.numel() > 0 and label_values_are_free(labels):
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= config.num_labels:
            bad = low if low < 0 else high
            raise ValueError(
                f"Classification label {bad} is outside the model's classes [0, {config.num_labels}): check the "
                "labels, or set `num_labels`/`id2label` in the config to cover them."
            )


class LocAtViTSegmentationHead(nn.Module):
    """The paper's linear segmentation head (SPEC §5): 1x1 conv -> GroupNorm(1) -> GELU -> 1x1 conv."""

    def __init__(self, config: LocAtViTConfig):
        super().__init__()
        self.projection = nn.Conv2d(config.hidden_size, config.decoder_hidden_size, kernel_size=1, bias=False)
        self.norm = nn.GroupNorm(1, config.decoder_hidden_size)
        self.activation = nn.GELU()
        self.classifier = nn.Conv2d(config.decoder_hidden_size, config.num_labels, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.activation(self.norm(self.projection(features))))


def tokens_to_feature_map(hidden_states: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """(batch, 1 + H*W, C) tokens -> (batch, C, H, W) map of the patch tokens."""
    patches = hidden_states[:, NUM_PREFIX_TOKENS:]
    # Contiguous, as DINOv2's maps: a channels-last view would give the 1x1 convs reading it channels-last weight
    # gradients, which DDP's gradient buckets then copy on every step ("Grad strides do not match bucket view").
    return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[-1], *grid_size).contiguous()


@auto_docstring(
    custom_intro="""
    LocAtViT with the paper's linear segmentation head on the last block's patch tokens (SPEC §5). Logits come at 1/16
    of the input resolution; the loss upsamples them bilinearly to the labels. With `config.freeze_backbone` the
    encoder stays frozen and in eval mode while the head trains, as in the paper's protocol.
    """
)
class LocAtViTForSemanticSegmentation(LocAtViTPreTrainedModel):
    # The loss is a mean over labelled pixels; the Trainer must not rescale it by its token count.
    accepts_loss_kwargs = False
    interpolates_by_default = True

    def __init__(self, config: LocAtViTConfig):
        super().__init__(config)
        self.locatvit = LocAtViTModel(config, add_final_norm=False)
        self.decode_head = LocAtViTSegmentationHead(config)
        self.post_init()
        self.set_backbone_frozen(config.freeze_backbone)

    def set_backbone_frozen(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the encoder: no gradients, and eval mode (no dropout/drop-path) even in `train()`."""
        self.config.freeze_backbone = frozen
        self.locatvit.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_backbone:
            self.locatvit.eval()
        return self

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SemanticSegmenterOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            Ground-truth class per pixel, in `[0, config.num_labels)` or `config.semantic_loss_ignore_index`.
        """
        interpolate_pos_encoding = self.interpolates(interpolate_pos_encoding)
        last_block, grid_size = self.locatvit.forward_features(pixel_values, interpolate_pos_encoding, **kwargs)
        logits = self.decode_head(tokens_to_feature_map(last_block, grid_size))
        loss = None
        if labels is not None:
            check_segmentation_labels(labels, pixel_values, self.config)
            upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(upsampled, labels.long(), ignore_index=self.config.semantic_loss_ignore_index)
        return SemanticSegmenterOutput(loss=loss, logits=logits)


def check_segmentation_labels(labels: torch.Tensor, pixel_values: torch.Tensor, config: LocAtViTConfig) -> None:
    if labels.ndim != 3 or labels.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"Segmentation `labels` must have shape (batch, height, width) = ({pixel_values.shape[0]}, H, W), got "
            f"{tuple(labels.shape)}: pass one label map per image, without a channel dimension."
        )
    if labels.is_floating_point():
        raise TypeError(f"Segmentation `labels` must be an integer tensor of class ids, got {labels.dtype}.")
    if not label_values_are_free(labels):
        return
    valid = labels != config.semantic_loss_ignore_index
    if valid.any():
        values = labels[valid]
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= config.num_labels:
            bad = low if low < 0 else high
            raise ValueError(
                f"Segmentation label value {bad} is outside [0, {config.num_labels}) and is not the ignore index "
                f"{config.semantic_loss_ignore_index}: remap the labels (e.g. `do_reduce_labels` for ADE20K) or set "
                "`num_labels`."
            )


@auto_docstring(
    custom_intro="""
    LocAtViT as a backbone: (batch, hidden, H/16, W/16) feature maps of the chosen blocks (`out_features` /
    `out_indices`; "stem" is the embeddings), taken before the final norm, for UperNet-, DPT- or Mask2Former-style heads.
    """
)
class LocAtViTBackbone(BackboneMixin, LocAtViTPreTrainedModel):
    interpolates_by_default = True

    def __init__(self, config: LocAtViTConfig):
        super().__init__(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.embeddings = LocAtViTEmbeddings(config)
        # Only the blocks up to the last returned stage: later ones would hold parameters no loss reaches (a checkpoint
        # of the whole encoder loads, its later blocks reported as unused).
        self.encoder = LocAtViTEncoder(config, num_layers=max(self.wanted_stages()))
        self.post_init()

    def wanted_stages(self) -> set[int]:
        return {index % len(self.stage_names) for index in self.out_indices}

    def get_input_embeddings(self) -> LocAtViTPatchEmbeddings:
        return self.embeddings.patch_embeddings

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BackboneOutput:
        wanted = self.wanted_stages()
        if max(wanted) > len(self.encoder.layers):
            raise ValueError(
                f"`out_indices` {self.out_indices} asks for stage {max(wanted)}, but this backbone holds only the first "
                f"{len(self.encoder.layers)} blocks: set `out_indices` in the config before building the model."
            )
        hidden_states, grid_size = self.embeddings(pixel_values, self.interpolates(interpolate_pos_encoding))
        feature_maps = [tokens_to_feature_map(hidden_states, grid_size)] if 0 in wanted else []
        for index, layer in enumerate(self.encoder.layers, start=1):
            hidden_states = layer(hidden_states, grid_size, **kwargs)
            if index in wanted:
                feature_maps.append(tokens_to_feature_map(hidden_states, grid_size))
        return BackboneOutput(feature_maps=tuple(feature_maps))


__all__ = [
    "LocAtViTBackbone",
    "LocAtViTForImageClassification",
    "LocAtViTForSemanticSegmentation",
    "LocAtViTModel",
    "LocAtViTPreTrainedModel",
]
