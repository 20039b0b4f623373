"""README's "Use it" section: where it sits, what it shows, and that every snippet runs as written (against tiny
models in an offline Hub cache under the snippets' repo ids)."""

import re
from pathlib import Path

import pytest
from PIL import Image

from .test_hub import run_offline
from .test_model_cards import make_release_hub, python_blocks, section

README = Path(__file__).resolve().parents[1] / "README.md"


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
