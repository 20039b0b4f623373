from pathlib import Path

import pytest
import torch

import locatvit_hf  # noqa: F401  (registers the Auto classes)
from locatvit_hf import (
    LocAtViTBackbone,
    LocAtViTConfig,
    LocAtViTForImageClassification,
    LocAtViTForSemanticSegmentation,
    LocAtViTModel,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
PARITY_DIR = SHARED / "parity"
SAMPLES_DIR = SHARED / "samples"
ALL_CLASSES = [LocAtViTModel, LocAtViTForImageClassification, LocAtViTForSemanticSegmentation, LocAtViTBackbone]


def tiny_config(**overrides) -> LocAtViTConfig:
    """A few-layer LocAtViT at 32 px (grid 4x4): fast enough for every test."""
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=5,
        decoder_hidden_size=16,
    )
    kwargs.update(overrides)
    return LocAtViTConfig(**kwargs)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not PARITY_DIR.is_dir():
        pytest.skip(f"{PARITY_DIR} is absent: the parity files of the original implementation are needed")
    return PARITY_DIR
