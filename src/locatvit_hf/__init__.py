"""LocAtViT (Locality-Attending Vision Transformer) for Hugging Face Transformers.

Importing the package registers the configuration and every model class with the Auto classes.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
)

from .configuration_locatvit import PRESETS, LocAtViTConfig
from .image_processing_locatvit import BACKEND_CLASSES, LocAtViTImageProcessor, LocAtViTImageProcessorPil
from .modeling_locatvit import (
    LocAtViTBackbone,
    LocAtViTForImageClassification,
    LocAtViTForSemanticSegmentation,
    LocAtViTModel,
    LocAtViTPreTrainedModel,
)

__version__ = "0.1.0"

_AUTO_CLASSES = {
    AutoModel: LocAtViTModel,
    AutoModelForImageClassification: LocAtViTForImageClassification,
    AutoModelForSemanticSegmentation: LocAtViTForSemanticSegmentation,
    AutoBackbone: LocAtViTBackbone,
}

AutoConfig.register(LocAtViTConfig.model_type, LocAtViTConfig, exist_ok=True)
LocAtViTConfig.register_for_auto_class()
for _auto_class, _model_class in _AUTO_CLASSES.items():
    _auto_class.register(LocAtViTConfig, _model_class, exist_ok=True)
    # Saved models then carry the model files, so they also load with `trust_remote_code=True` without this package.
    _model_class.register_for_auto_class(_auto_class.__name__)
AutoImageProcessor.register(LocAtViTConfig, image_processor_classes=dict(BACKEND_CLASSES), exist_ok=True)
for _processor_class in BACKEND_CLASSES.values():
    _processor_class.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "PRESETS",
    "LocAtViTBackbone",
    "LocAtViTConfig",
    "LocAtViTForImageClassification",
    "LocAtViTForSemanticSegmentation",
    "LocAtViTImageProcessor",
    "LocAtViTImageProcessorPil",
    "LocAtViTModel",
    "LocAtViTPreTrainedModel",
]
