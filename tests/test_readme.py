"""README's snippets: where "Use it" sits, what it shows, and that every snippet runs as written (those of "Use it"
against tiny models in an offline Hub cache under the snippets' repo ids; the model and Trainer snippets of "Models"
and "Training" as they are); and that the README shows the exact command lines CI and users run."""

import math
import re
from pathlib import Path

import pytest
from PIL import Image

from .test_hub import run_offline
from .test_model_cards import make_release_hub, python_blocks, section

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def use_it() -> str:
    return section(README.read_text(encoding="utf-8"), "Use it")


BLOCKS = python_blocks(use_it())


@pytest.fixture(scope="module")
def release_hub(tmp_path_factory):
    return make_release_hub(tmp_path_factory.mktemp("readme_hub"))


def test_use_it_follows_the_first_code_block():
    text = README.read_text(encoding="utf-8")
    first_block_end = text.index("```", text.index("```") + 3)
    heading = text.index("\n## Use it\n")
    assert first_block_end < heading
    assert "```" not in text[first_block_end + 3 : heading]  # nothing but prose between them
    assert "\n## " not in text[first_block_end:heading]


def test_use_it_shows_the_three_pipelines_and_from_pretrained_in_five_lines_each():
    assert len(BLOCKS) == 4
    shown = [
        re.search(r'pipeline\("([\w-]+)"', block).group(1) if "pipeline(" in block else "from_pretrained"
        for block in BLOCKS
    ]
    assert shown == ["image-classification", "image-segmentation", "image-feature-extraction", "from_pretrained"]
    assert ".from_pretrained(" in BLOCKS[3]
    for block in BLOCKS:
        code = [line for line in block.splitlines() if line.strip() and not line.startswith(("import ", "from "))]
        assert len(code) <= 5, block


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_use_it_snippet_runs(release_hub, index):
    hf_home, work = release_hub
    result = run_offline(BLOCKS[index], hf_home, work)
    assert result.returncode == 0, f"{BLOCKS[index]}\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
    assert result.stdout.strip(), "the snippet printed nothing"
    if 'pipeline("image-segmentation"' in BLOCKS[index]:  # one line per mask, each at the image's size
        with Image.open(work / "image.jpg") as image:
            size = str(image.size)
        lines = result.stdout.strip().splitlines()
        assert lines and all(line.endswith(size) for line in lines), (size, lines)


OTHER_BLOCKS = {
    title: python_blocks(section(README.read_text(encoding="utf-8"), title)) for title in ("Models", "Training")
}


def test_models_and_training_show_one_snippet_each():
    assert {title: len(blocks) for title, blocks in OTHER_BLOCKS.items()} == {"Models": 1, "Training": 1}
    assert (
        "use_gaussian_attention" in OTHER_BLOCKS["Models"][0] and "use_patch_refinement" in OTHER_BLOCKS["Models"][0]
    )
    assert "Trainer(" in OTHER_BLOCKS["Training"][0] and ".train()" in OTHER_BLOCKS["Training"][0]


def test_models_snippet_builds_a_classifier_from_the_preset(tmp_path):
    result = run_offline(OTHER_BLOCKS["Models"][0], tmp_path / "hf", tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("torch.Size([1, 1000])"), result.stdout


def test_training_snippet_trains_with_the_stock_trainer(tmp_path):
    result = run_offline(OTHER_BLOCKS["Training"][0], tmp_path / "hf", tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    loss = float(result.stdout.strip().splitlines()[-1])
    assert math.isfinite(loss) and loss > 0  # the mean training loss of the two steps
    assert (tmp_path / "runs/my-run/checkpoint-2/model.safetensors").is_file()


def test_readme_shows_the_ci_test_command_and_the_main_job_verbatim():
    readme = README.read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    test_command = ci[ci.index("# The README's test command, verbatim:") + 1]
    assert test_command in readme.splitlines()
    assert (
        'python -m pip install torch==2.14.1 torchvision==0.29.1 && python -m pip install -e ".[examples]" && '
        "python examples/run_semantic_segmentation.py --output_dir runs/seg-demo"
    ) in readme.splitlines()


REPRODUCTION = ROOT / "docs" / "reproduction.md"


def test_reproduction_doc_visualization_snippet_runs(tmp_path):
    """docs/reproduction.md's snippet, against a stand-in of the reproduction script's output folder: its data layout
    and a LocAtViT classifier and probe (untrained, the recorded run's sizes) where the script saves them."""
    from synthetic_scenes import SYNTHETIC_CLASS_NAMES, make_synthetic_scenes

    from locatvit_hf import LocAtViTForImageClassification, LocAtViTForSemanticSegmentation

    from .conftest import tiny_config

    (snippet,) = python_blocks(REPRODUCTION.read_text(encoding="utf-8"))
    out = tmp_path / "runs" / "reproduce_locality"
    for kind in ("images", "annotations"):
        (out / "data/ade" / kind / "validation").mkdir(parents=True)
    for index, scene in enumerate(make_synthetic_scenes(5, seed=1)):
        Image.fromarray(scene.image).save(out / f"data/ade/images/validation/scene_{index:05d}.png")
        Image.fromarray(scene.mask).save(out / f"data/ade/annotations/validation/scene_{index:05d}.png")
    sizes = dict(image_size=64, patch_size=8, num_hidden_layers=6)
    labels = dict(enumerate(SYNTHETIC_CLASS_NAMES))
    LocAtViTForImageClassification(tiny_config(**sizes, num_labels=8)).save_pretrained(
        out / "runs/locatvit/seed0/pretrain"
    )
    LocAtViTForSemanticSegmentation(tiny_config(**sizes, num_labels=len(labels), id2label=labels)).save_pretrained(
        out / "runs/locatvit/seed0/probe"
    )
    result = run_offline(snippet, tmp_path / "hf", tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    for name in ("gaussian_statistics.png", "attention_map.png", "segmentation.png"):
        with Image.open(tmp_path / name) as figure:
            assert figure.format == "PNG" and min(figure.size) > 100, (name, figure.size)
