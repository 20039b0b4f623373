"""PyTorch LocAtViT: a ViT with Gaussian-augmented attention (GAug) and patch representation refinement (PRR).

Hajimiri et al., "Locality-Attending Vision Transformer", ICLR 2026. The method in this project's words, with every formula and constant: docs/method.md.
"""

import math

import torch
from torch import nn
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
from transformers.modeling_utils import AttentionInterface, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .attention_locatvit import (
    FLUSH_CLAMP,
    NUM_PREFIX_TOKENS,
    PROFILE_FLOOR,
    BiasWorkspace,
    Float32Projection,
    FlushedProfiles,
    exported_profiles,
    flushed_exp,
    full_bias,
    gaussian_attention,
    grid_distance_table,
    query_distance_tables,
    reuses_buffers,
    traced,
    triton_profiles,
)
from .configuration_locatvit import LocAtViTConfig
from .cpu_attention_locatvit import fused_cpu_profiles, gaussian_profiles
from .validation_locatvit import check_classification_labels, check_pixel_values, check_segmentation_labels

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


def resampling_matrix(size: int, new_size: int, device: torch.device) -> torch.Tensor:
    """(new_size, size) float32 matrix of `F.interpolate`'s bicubic antialiased resampling along one axis: the
    identity resampled, so its rows are the weights that resampling gives each input."""
    # `size` one-hot images of 1 x size. (As size x 1 images, the tensor's layout is also channels-last, where PyTorch
    # 2.14's CPU kernel returns a constant along the resampled axis.)
    identity = torch.eye(size, device=device).reshape(1, size, 1, size)
    resampled = F.interpolate(identity, size=(1, new_size), mode="bicubic", antialias=True, align_corners=False)
    return resampled[0, :, 0, :].t()


class LocAtViTEmbeddings(nn.Module):
    """CLS token + patch embeddings + learned absolute position embeddings (resampled for other grids: docs/method.md#other-resolutions)."""

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
        `resample_abs_pos_embed`), the CLS part untouched. At the configured grid the resampling is the identity
        (exactly), and skipped, except under `torch.export`, so that an export at that size serves every size.

        The resampling is separable: one matrix per axis (`resampling_matrix`), applied as two matrix products, whose
        gradient is two more. `F.interpolate`'s own backward fails under `torch.compile` once sizes are dynamic (the
        second image size a compiled model trains on)."""
        if not torch.compiler.is_exporting() and tuple(grid_size) == tuple(self.grid_size):
            return self.position_embeddings
        prefix = self.position_embeddings[:, :NUM_PREFIX_TOKENS]
        patch = self.position_embeddings[:, NUM_PREFIX_TOKENS:]
        dim = patch.shape[-1]
        patch = patch.float().reshape(*self.grid_size, dim).permute(2, 0, 1)  # (dim, rows, columns)
        rows = resampling_matrix(self.grid_size[0], grid_size[0], patch.device)
        columns = resampling_matrix(self.grid_size[1], grid_size[1], patch.device)
        with torch.autocast(device_type=patch.device.type, enabled=False):  # float32 under mixed precision too
            patch = rows @ patch @ columns.t()
        patch = patch.permute(1, 2, 0).reshape(1, -1, dim).to(prefix.dtype)
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


class LocAtViTStatisticsMap(nn.Module):
    """A linear map from a head's query to statistics of its Gaussian (`weight`, `bias`, as `nn.Linear` holds them).

    `LocAtViTGaussianBias` reads both maps' parameters into one float32 product instead of calling them, so they are
    not `nn.Linear`s: tools that rewrite every Linear layer (LoRA on "all-linear", dynamic quantization) would wrap
    these in a forward that never runs, and their adapters or quantized weights would be ignored.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return F.linear(queries, self.weight, self.bias)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}"


class LocAtViTGaussianBias(nn.Module):
    """GAug (docs/method.md#gaussian-augmented-attention-gaug): an additive attention bias pulling each patch query towards its neighbours.

    For query patch i at grid position (r_i, c_i) and key patch j:
        B_ij = alpha_i * exp(d_row(i, j) / (var_i[0] + eps) + d_col(i, j) / (var_i[1] + eps)),
    with d = -0.5 * squared distance, and per-query variances `var_i` and strength `alpha_i` predicted from q_i by two
    tiny linear maps shared by all heads of the layer. The exponential factorizes into a row profile
    alpha_i * exp(d_row / (var_i[0] + eps)) over the H rows and a column profile exp(d_col / (var_i[1] + eps)) over
    the W columns: (H + W) exponentials per query instead of H * W, evaluated in float32. This module returns those
    profiles, on every attention backend (so forward hooks here see every layer's Gaussian; in training on
    `cuda_triton` once more in backward, which computes them again instead of keeping them); the backends of
    `attention_locatvit` add their outer product to the attention logits.
    """

    def __init__(self, config: LocAtViTConfig):
        super().__init__()
        self.variance_proj = LocAtViTStatisticsMap(config.head_dim, 2)
        self.strength_proj = LocAtViTStatisticsMap(config.head_dim, 1)
        self.initial_grid = tuple(config.grid_size)
        side = max(self.initial_grid)
        self.max_variance = float(side**2)
        self.variance_shift = math.log(self.max_variance - 1) if self.max_variance > 2 else 0.0
        # eps keeps the division finite in float16, the clamp keeps exp's argument there: docs/method.md#numerical-safeguards-eps-and-the-distance-clamp.
        eps = 0.1
        while 0.5 * (side - 1) ** 2 / eps**2 > 32500:
            eps *= 2
        self.eps = eps
        self.min_half_sq_distance = max(-0.5 * (side - 1) ** 2, -6550.0)
        # Only models configured at >= 32 patches a side use the original's pooled-query shortcut in training.
        self.pools_queries_in_training = min(self.initial_grid) >= 32
        # Set by the encoder: a buffer shared by its layers, reused when no gradient is recorded.
        self.workspace: BiasWorkspace | None = None

    def variance_scale(self, grid_size: tuple[int, int]) -> float:
        """The variances' upper bound: the configured grid's squared side, rescaled with the grid (docs/method.md#variances-and-strength-from-the-query)."""
        return self.max_variance * (torch.sym_min(*grid_size) / min(self.initial_grid))  # exactly 1x at the start

    def query_distances(self, grid_size: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """-0.5 * squared distances from each patch query (row-major) to every grid row and column, clamped as in the
        original and divided by `variance_scale`: a (2, max(H, W), P) table (`query_distance_tables`)."""
        args = (*grid_size, self.min_half_sq_distance, self.variance_scale(grid_size), dtype)
        if traced():
            return query_distance_tables.__wrapped__(*args, device)
        return query_distance_tables(*args, torch.device(device))

    def statistics_map(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The variance and strength maps as one (3, head_dim) weight and (3,) bias in `dtype`, the variance's shift
        in the bias: statistics = weight q + bias."""
        weight = torch.cat((self.variance_proj.weight, self.strength_proj.weight)).to(dtype)
        bias = torch.cat((self.variance_proj.bias - self.variance_shift, self.strength_proj.bias)).to(dtype)
        return weight, bias

    def statistics(self, queries: torch.Tensor) -> torch.Tensor:
        """The variance (2: row, column) and strength (1) maps' outputs, before their activations, for `queries`
        (batch, heads, tokens, head_dim): a tokens-last (batch, heads, 3, tokens) view, in float32 (float64 for
        float64 queries), with the variance's shift included."""
        dtype = torch.promote_types(queries.dtype, torch.float32)
        with torch.autocast(device_type=queries.device.type, enabled=False):
            # Both maps in one matmul over the token-major layout the q projection wrote (no copy for its view), as
            # (3, head_dim) x (head_dim, batch * tokens * heads): twice as fast as the tall-and-thin product.
            weight, bias = self.statistics_map(dtype)
            batch, heads, tokens, head_dim = queries.shape
            token_major = queries.transpose(1, 2).reshape(-1, head_dim)
            if token_major.dtype != dtype and torch.is_grad_enabled() and not traced():
                projected = Float32Projection.apply(token_major, weight, bias)
            else:
                projected = torch.addmm(bias[:, None], weight, token_major.to(dtype).t())
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
            if exponent.requires_grad and not traced():
                return FlushedProfiles.apply(exponent, height, width)
            row, col = flushed_exp(exponent).unbind(-3)
        # Inference reads the row profiles as they are (a copy would cost more than it saves), the column profiles
        # contiguous; a non-square grid drops the table's padding.
        return row[..., :height, :].transpose(-1, -2), col[..., :width, :].transpose(-1, -2).contiguous()

    def forward(self, query: torch.Tensor, grid_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Row (batch, heads, P, H) and column (batch, heads, P, W) profiles of every patch query: the bias of patch
        query i and patch key j = (r, c) is row[i, r] * col[i, c]. Without a gradient (and with a workspace), they
        are (views of) reused buffers, valid until the next layer's call. A kernel computes them in one pass (and its
        backward their gradient): on CPU in float32 the fused kernel's `gaussian_profiles`, on GPUs where the Triton
        kernels are chosen (`attention_locatvit.triton_profiles`) `triton_gaussian_profiles`, which computes the
        statistics too; elsewhere `profiles`."""
        if self.training and self.pools_queries_in_training:
            return self._pooled_profiles(query[:, :, NUM_PREFIX_TOKENS:], grid_size)
        height, width = grid_size
        if (kernel := triton_profiles(query)) is not None:  # the statistics, too, inside the kernel
            with torch.autocast(device_type=query.device.type, enabled=False):
                weight, bias = self.statistics_map(torch.float32)
                return kernel(query, weight, bias, *self.kernel_constants(grid_size, query.device), height, width)
        statistics = self.statistics(query)[..., NUM_PREFIX_TOKENS:]
        if torch.compiler.is_exporting():  # plain operators of symbolic sizes; contiguous: no guard on the batch size
            scale = self.variance_scale(grid_size)
            return exported_profiles(statistics.contiguous(), grid_size, self.min_half_sq_distance, scale, self.eps)
        batch, heads, seq_len, _ = query.shape
        patches = seq_len - NUM_PREFIX_TOKENS
        on_cpu = statistics.device.type == "cpu" and statistics.dtype == torch.float32
        write_profiles = fused_cpu_profiles() if on_cpu else None  # the kernel's operators, traced by `torch.compile`
        if write_profiles is not None:
            constants = self.kernel_constants(grid_size, query.device)
            if not reuses_buffers(self.workspace):  # with its gradient, if one is recorded
                return gaussian_profiles(statistics, *constants, height, width)
            row = self.workspace.get("row profiles", (batch, heads, patches, height), statistics.dtype, query.device)
            col = self.workspace.get("column profiles", (batch, heads, patches, width), statistics.dtype, query.device)
            write_profiles(row, col, statistics, *constants)
            return row, col
        distances = self.query_distances(grid_size, statistics.dtype, query.device)
        out = None
        if reuses_buffers(self.workspace):
            shape = (batch, heads, *distances.shape[:2], patches)
            out = self.workspace.get("profiles", shape, statistics.dtype, query.device)
        return self.profiles(statistics, distances, grid_size, out)

    def kernel_constants(self, grid_size: tuple[int, int], device: torch.device) -> tuple:
        """The profile kernels' arguments after the statistics: the grid's (S, S) distance table
        (`grid_distance_table`), eps / scale, the flush floor and the exponent's clamp."""
        scale = self.variance_scale(grid_size)
        table = grid_distance_table.__wrapped__ if traced() else grid_distance_table  # a tracer skips caches
        distances = table(max(grid_size), self.min_half_sq_distance, scale, torch.float32, device)
        return distances, self.eps / scale, PROFILE_FLOOR, FLUSH_CLAMP

    def _pooled_profiles(self, patch_queries: torch.Tensor, grid_size: tuple[int, int]):
        """Profiles of the original's training shortcut for large initial grids (`pooled_queries`): the bias on
        every second grid row and column, for queries and keys alike, repeated over each 2x2 block. So each block's
        four queries share their profiles, and each profile reads the even row (column) of a key's block."""
        pooled, corners, block = self.pooled_queries(patch_queries, grid_size)
        statistics = self.statistics(pooled)
        distances = self.query_distances(grid_size, statistics.dtype, patch_queries.device)[..., corners]
        row_profile, col_profile = self.profiles(statistics, distances, grid_size)
        height, width = grid_size
        even_rows = torch.arange(height, device=pooled.device) // 2 * 2
        even_cols = torch.arange(width, device=pooled.device) // 2 * 2
        return row_profile[:, :, block][..., even_rows], col_profile[:, :, block][..., even_cols]

    def pooled_queries(self, patch_queries: torch.Tensor, grid_size: tuple[int, int]):
        """The original's training shortcut for large initial grids (docs/method.md#pooled-query-shortcut-for-large-initial-grids): queries average-pooled over 2x2 patch
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


def locatvit_attention_forward(
    module, query, key, value, attention_mask, *, scaling, dropout=0.0, grid_size, **kwargs
):
    """LocAtViT's `eager` and `sdpa`: `gaussian_attention` chooses one of the attention backends (the decision table of
    `attention_locatvit`, or `config.attention_backend`) and adds `module`'s Gaussian bias inside it. Images have no
    padding: `attention_mask` is None."""
    gaussian = None if module.gaussian_bias is None else (lambda query: module.gaussian_bias(query, grid_size))
    return gaussian_attention(
        query,
        key,
        value,
        gaussian,
        implementation=module.config._attn_implementation,
        forced=module.config.attention_backend,
        scale=scaling,
        dropout=dropout,
        num_prefix=NUM_PREFIX_TOKENS,
        workspace=None if module.gaussian_bias is None else module.gaussian_bias.workspace,
    )


# `eager` and `sdpa` are LocAtViT's own, since the Gaussian bias needs its backends; any other function registered with
# transformers' `AttentionInterface` (a Hub kernel, your own) gets the bias as its float `attention_mask`.
ALL_ATTENTION_FUNCTIONS = AttentionInterface()
ALL_ATTENTION_FUNCTIONS["sdpa"] = locatvit_attention_forward


class LocAtViTAttention(nn.Module):
    """Multi-head self-attention whose logits get the Gaussian bias: q, k, v, one attention function (LocAtViT's own,
    `locatvit_attention_forward`, unless `attn_implementation` names another), the output projection."""

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
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, locatvit_attention_forward
        )
        attention_mask = None
        if attention_interface is not locatvit_attention_forward:
            attention_mask = self.bias_as_mask(query, grid_size)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0,
            grid_size=grid_size,
            **kwargs,
        )
        return self.o_proj(attn_output.reshape(*input_shape, -1)), attn_weights

    def bias_as_mask(self, query: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor | None:
        """The whole (batch, heads, N, N) Gaussian bias in `query`'s dtype, the float `attention_mask` of an attention
        function registered with transformers (None without GAug)."""
        if self.config.attention_backend is not None:
            raise ValueError(
                f"`attention_backend={self.config.attention_backend!r}` chooses one of LocAtViT's backends, which run "
                f"with `attn_implementation` 'eager' or 'sdpa', not {self.config._attn_implementation!r}: set "
                "`attention_backend=None` or `attn_implementation='sdpa'`."
            )
        if self.gaussian_bias is None:
            return None
        return full_bias(*self.gaussian_bias(query, grid_size), NUM_PREFIX_TOKENS).to(query.dtype)


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
    """PRR (docs/method.md#patch-representation-refinement-prr): parameter-free multi-head self-attention of the normed tokens with themselves.

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


@auto_docstring
class LocAtViTPreTrainedModel(PreTrainedModel):
    config: LocAtViTConfig
    base_model_prefix = "locatvit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["LocAtViTEmbeddings", "LocAtViTLayer"]
    _supports_sdpa = True
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
        """timm's ViT initialization (docs/method.md#initialization): truncated normal 0.02 for Linear weights and the position embedding,
        normal 1e-6 for the CLS token, PyTorch's defaults for the patch-embedding conv and the norms. The Gaussian's
        statistics maps and the 1x1 convs of the segmentation head are linear maps and start like the Linear layers."""
        std = self.config.initializer_range
        linear = (nn.Linear, LocAtViTStatisticsMap)
        if isinstance(module, linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)):
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
    LocAtViT with a linear classifier on the CLS token of the refined output (docs/method.md#patch-representation-refinement-prr), e.g. for ImageNet.
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


class LocAtViTSegmentationHead(nn.Module):
    """The paper's linear segmentation head (docs/method.md#features-and-head): 1x1 conv -> GroupNorm(1) -> GELU -> 1x1 conv."""

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
    LocAtViT with the paper's linear segmentation head on the last block's patch tokens (docs/method.md#features-and-head). Logits come at 1/16
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
        stages = [hidden_states] if 0 in wanted else []
        for index, layer in enumerate(self.encoder.layers, start=1):
            hidden_states = layer(hidden_states, grid_size, **kwargs)
            if index in wanted:
                stages.append(hidden_states)
        if self.config.reshape_hidden_states:
            stages = [tokens_to_feature_map(tokens, grid_size) for tokens in stages]
        return BackboneOutput(feature_maps=tuple(stages))


__all__ = [
    "LocAtViTBackbone",
    "LocAtViTForImageClassification",
    "LocAtViTForSemanticSegmentation",
    "LocAtViTModel",
    "LocAtViTPreTrainedModel",
]
