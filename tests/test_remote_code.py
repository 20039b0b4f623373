"""A saved model loads with `trust_remote_code=True` in a Python where `locatvit_hf` cannot be imported."""

import os
import subprocess
import sys
import textwrap

import torch

from locatvit_hf import LocAtViTForSemanticSegmentation, LocAtViTImageProcessor, LocAtViTModel

from .conftest import tiny_config

REMOTE_LOAD = textwrap.dedent(
    """
    import sys
    sys.modules["locatvit_hf"] = None  # `import locatvit_hf` now raises ImportError
    try:
        import locatvit_hf
    except ImportError:
        pass
    else:
        raise SystemExit("locatvit_hf is importable")

    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation

    folder = sys.argv[1]
    inputs = torch.load(folder + "/inputs.pt")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__module__.startswith("transformers_modules"), type(config).__module__
    model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == "LocAtViTForSemanticSegmentation"
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        logits = model(inputs["pixel_values"]).logits
        base_model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        base = base_model(inputs["pixel_values"])
    # The code copied next to the checkpoint has no C++ source: the mask path runs instead of the package's fused CPU
    # kernel, equal to float32 rounding.
    (kernel,) = [m for name, m in sys.modules.items() if name.endswith(".cpu_attention_locatvit")]
    assert kernel.__name__.startswith("transformers_modules") and not kernel.kernel_available()
    torch.testing.assert_close(logits, inputs["logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base.last_hidden_state, inputs["last_hidden_state"], rtol=1e-5, atol=1e-6)
    # The image processor, in either backend, from the code saved with it.
    for backend, name in [("torchvision", "LocAtViTImageProcessor"), ("pil", "LocAtViTImageProcessorPil")]:
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, backend=backend)
        assert type(processor).__name__ == name, (backend, type(processor))
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    print("REMOTE OK", type(base_model).__name__)
    """
)


def test_remote_code_load_without_package(tmp_path):
    model = LocAtViTForSemanticSegmentation(tiny_config()).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    LocAtViTImageProcessor().save_pretrained(folder)
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits = model(pixel_values).logits
        # The base model of a segmentation checkpoint: its final norm, which segmentation does not hold, is new.
        last_hidden_state = LocAtViTModel.from_pretrained(folder).eval()(pixel_values).last_hidden_state
    torch.save(
        {"pixel_values": pixel_values, "logits": logits, "last_hidden_state": last_hidden_state},
        folder / "inputs.pt",
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(folder)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE OK LocAtViTModel" in result.stdout
