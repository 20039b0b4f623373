"""LocAtViT configuration: a ViT configuration plus the two switches of the paper."""

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import PreTrainedConfig

# docs/method.md#backbone. Patch 16, image 224 and the other ViT defaults are shared by all sizes.
PRESETS = {
    "tiny": {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768},
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}

# Written into every saved config, so that a saved model loads with `trust_remote_code=True` through any Auto class,
# whichever head it was saved with.
AUTO_MAP = {
    "AutoConfig": "configuration_locatvit.LocAtViTConfig",
    "AutoModel": "modeling_locatvit.LocAtViTModel",
    "AutoModelForImageClassification": "modeling_locatvit.LocAtViTForImageClassification",
    "AutoModelForSemanticSegmentation": "modeling_locatvit.LocAtViTForSemanticSegmentation",
    "AutoBackbone": "modeling_locatvit.LocAtViTBackbone",
}


@strict(accept_kwargs=True)
class LocAtViTConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a Locality-Attending Vision Transformer (Hajimiri et al., ICLR 2026).

    The ViT fields carry the same names and meanings as in [`ViTConfig`]. The defaults are LocAtViT-Tiny at 224 px
    (docs/method.md#backbone); `LocAtViTConfig.from_preset("base")` gives the other sizes.

    Args:
        use_gaussian_attention (`bool`, defaults to `True`):
            Add the learnable, query-dependent Gaussian locality bias (GAug) to the attention logits of every layer.
        use_patch_refinement (`bool`, defaults to `True`):
            Apply the parameter-free self-attention (PRR) to the final normed tokens. With both switches off the model
            is the paper's plain-ViT baseline.
        decoder_hidden_size (`int`, defaults to 512):
            Width of the paper's linear segmentation head (1x1 conv, GroupNorm, GELU, 1x1 conv).
        semantic_loss_ignore_index (`int`, defaults to 255):
            Label value ignored by the segmentation loss.
        interpolate_pos_encoding (`bool`, *optional*):
            Default of the forward argument of the same name: resample the position embeddings for inputs of another
            size than `image_size` instead of raising. `None` leaves it to the model: segmentation models and
            backbones, which see whole images of any size, resample (as DINOv2 does); classifiers and `LocAtViTModel`
            raise, as ViT's do.
        attention_backend (`str`, *optional*):
            Force one backend of the Gaussian-biased attention (`"eager"`, `"sdpa"`, `"cpu_fused"`, `"blocked"`,
            `"cuda_triton"`, `"cuda_chunked"`; see `attention_locatvit.py` and the README's table). `None` chooses
            per call by device, dtype, gradient and `attn_implementation`; a forced backend that cannot run a call
            raises, naming why.
        freeze_backbone (`bool`, defaults to `False`):
            In [`LocAtViTForSemanticSegmentation`], keep the encoder frozen and in eval mode while the head trains, as
            in the paper's linear-probing protocol.
        out_features / out_indices:
            Which stages [`LocAtViTBackbone`] returns: `"stem"` (the embeddings) and `"stage1"` ... `"stageN"` (the
            blocks' outputs).
        reshape_hidden_states (`bool`, defaults to `True`):
            Whether [`LocAtViTBackbone`] returns (batch, C, H, W) maps of the patch tokens, or, with `False`, the
            (batch, 1 + H*W, C) token sequences, class token first, as DINOv2's backbone does: the form Depth
            Anything's neck reads.
    """

    model_type = "locatvit"

    hidden_size: int = 192
    num_hidden_layers: int = 12
    num_attention_heads: int = 3
    intermediate_size: int = 768
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    drop_path_rate: float | int = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int | list[int] | tuple[int, int] = 16
    num_channels: int = 3
    qkv_bias: bool = True
    use_gaussian_attention: bool = True
    use_patch_refinement: bool = True
    decoder_hidden_size: int = 512
    semantic_loss_ignore_index: int = 255
    interpolate_pos_encoding: bool | None = None
    freeze_backbone: bool = False
    attention_backend: str | None = None
    reshape_hidden_states: bool = True
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        self.image_size = _pair(self.image_size, "image_size")
        self.patch_size = _pair(self.patch_size, "patch_size")
        self._validate_architecture()
        self.stage_names = ["stem"] + [f"stage{idx}" for idx in range(1, self.num_hidden_layers + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        if getattr(self, "auto_map", None) is None and "auto_map" not in kwargs:
            self.auto_map = dict(AUTO_MAP)
        self._validate_labels(kwargs.get("num_labels"))
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "LocAtViTConfig":
        if "architecture" in config_dict and "pretrained_cfg" in config_dict:
            # Read as a LocAtViT config it would give a randomly initialized default model, every weight reported
            # missing: the authors' checkpoints are timm's format and need converting.
            raise ValueError(
                f"This is a timm configuration (architecture {config_dict['architecture']!r}), the format of the "
                "authors' checkpoints, not a Transformers one. Convert the checkpoint once with `python -m "
                "locatvit_hf.convert --checkpoint PATH_OR_REPO --output DIR` and load DIR, or build the model from it "
                "with `locatvit_hf.convert.load_converted(PATH_OR_REPO, task)`."
            )
        # `from_pretrained(..., num_labels=N)` asks for a new head, as for every model: the saved class names of
        # another number of classes no longer apply (a config file contradicting itself is still refused).
        saved_labels = config_dict.get("id2label")
        if (
            kwargs.get("num_labels") is not None
            and saved_labels is not None
            and len(saved_labels) != kwargs["num_labels"]
        ):
            config_dict = {key: value for key, value in config_dict.items() if key not in ("id2label", "label2id")}
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "LocAtViTConfig":
        """The configuration of a released size (`"tiny"`, `"small"` or `"base"`), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"Unknown LocAtViT preset {name!r}: choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **kwargs})

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of the configured image size: the Gaussian's initial grid (H0, W0)."""
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def _validate_architecture(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads}): change one of them, e.g. hidden_size="
                f"{self.num_attention_heads * max(1, round(self.hidden_size / self.num_attention_heads))}."
            )
        for side, (image, patch) in zip(("height", "width"), zip(self.image_size, self.patch_size)):
            if patch > image:
                raise ValueError(
                    f"`patch_size` {patch} is larger than the image {side} {image}: use a smaller `patch_size` or a "
                    "larger `image_size`."
                )
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"Unknown `hidden_act` {self.hidden_act!r}: use one of the names in ACT2FN, e.g. 'gelu'.")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"`layer_norm_eps` must be positive, got {self.layer_norm_eps!r}.")
        if self.decoder_hidden_size <= 0:
            raise ValueError(f"`decoder_hidden_size` must be positive, got {self.decoder_hidden_size!r}.")

    def _validate_labels(self, num_labels: int | None) -> None:
        if self.id2label is not None and num_labels is not None and len(self.id2label) != num_labels:
            raise ValueError(
                f"`id2label` has {len(self.id2label)} entries but `num_labels` is {num_labels}: pass matching "
                "values, or only `id2label`."
            )


def _pair(value, name: str) -> list[int]:
    """An int or a (height, width) pair, as a two-item list of positive ints."""
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in pair):
        raise ValueError(f"`{name}` must be a positive int or a (height, width) pair of them, got {value!r}.")
    return pair


__all__ = ["LocAtViTConfig", "PRESETS"]
