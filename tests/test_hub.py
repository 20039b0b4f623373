"""Hub round trip: what `save_pretrained` / `push_to_hub` write, the pull path from a real (offline) Hugging Face cache,
and the push path up to the network (`huggingface_hub.HfApi`).

The helpers `fill_hub_cache`, `save_tiny_repo`, `run_offline` and `HubRecorder` are shared with the model card and
README tests.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import load as load_safetensors_bytes
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

from locatvit_hf import (
    LocAtViTBackbone,
    LocAtViTForImageClassification,
    LocAtViTForSemanticSegmentation,
    LocAtViTImageProcessor,
    LocAtViTModel,
)

from .conftest import tiny_config

MODEL_CODE_FILES = {
    "configuration_locatvit.py",
    "modeling_locatvit.py",
    "attention_locatvit.py",
    "validation_locatvit.py",
    "triton_attention_locatvit.py",
    "cpu_attention_locatvit.py",
}
MODEL_FILES = {"model.safetensors", "config.json"} | MODEL_CODE_FILES
# The converter and the example scripts add the LocAtViT model card; `push_to_hub` adds transformers' own to a new repo.
CARD = "README.md"
PROCESSOR_FILES = {"preprocessor_config.json", "image_processing_locatvit.py"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
PIPELINE_TAGS = {
    LocAtViTForImageClassification: "image-classification",
    LocAtViTForSemanticSegmentation: "image-segmentation",
    LocAtViTModel: "image-feature-extraction",
    LocAtViTBackbone: "image-feature-extraction",
}


# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers


def tiny_processor(task: str) -> LocAtViTImageProcessor:
    """The converter's preprocessing for `task`, scaled down to the 32 px test models."""
    if task == "semantic-segmentation":  # the protocol's "fit within" resize (any aspect ratio, whole image)
        return LocAtViTImageProcessor.for_segmentation(size={"shortest_edge": 32, "longest_edge": 128})
    return LocAtViTImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})


def save_tiny_repo(folder: Path, task: str = "image-classification", **config_overrides) -> Path:
    """A tiny model of `task` and its image processor, saved as a Hub repo holds them."""
    model_class = {
        "image-classification": LocAtViTForImageClassification,
        "semantic-segmentation": LocAtViTForSemanticSegmentation,
    }[task]
    if task == "semantic-segmentation":  # as the converter saves segmentation models: any input size
        config_overrides.setdefault("interpolate_pos_encoding", True)
    model_class(tiny_config(**config_overrides)).eval().save_pretrained(folder)
    tiny_processor(task).save_pretrained(folder)
    return folder


def fill_hub_cache(hf_home: Path, repo_id: str, folder: Path) -> Path:
    """Lay the files of `folder` out in the Hugging Face cache under `hf_home` as downloads leave them:
    `hub/models--org--name/blobs/<sha256>`, `snapshots/<commit>/<file>` linking to the blob, and `refs/main` naming
    the commit. Returns the snapshot folder."""
    files = sorted(path for path in Path(folder).iterdir() if path.is_file())
    commit = hashlib.sha1("".join(f"{p.name}:{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in files).encode())
    commit = commit.hexdigest()
    repo_dir = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in files:
        content = path.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        link = snapshot / path.name
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def offline_env(hf_home: Path) -> dict:
    """The environment of a process that reads the Hub only from the cache under `hf_home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    return env


def run_offline(code: str, hf_home: Path, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run Python `code` in a fresh interpreter in offline mode, with the Hub cache under `hf_home`."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=offline_env(hf_home),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


class HubRecorder:
    """Stands in for the Hub at the `huggingface_hub.HfApi` boundary: records the repos created and the files of every
    commit (read when the commit is made, since `push_to_hub` deletes its temporary folder afterwards). Repos have no
    files, unless `remote_card` gives the README.md they hold. Sockets are blocked, so any other network call fails."""

    def __init__(self, monkeypatch, remote_card: str | None = None, tmp_path: Path | None = None):
        self.repos: list[str] = []
        self.commits: list[dict] = []
        recorder = self

        def create_repo(api, repo_id, *args, **kwargs):
            recorder.repos.append(repo_id)
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_commit(api, repo_id, operations, *args, commit_message=None, **kwargs):
            files = {}
            for operation in operations:
                assert isinstance(operation, huggingface_hub.CommitOperationAdd), operation
                with operation.as_file() as file:
                    files[operation.path_in_repo] = file.read()
            recorder.commits.append({"repo_id": repo_id, "files": files, "message": commit_message})
            return huggingface_hub.CommitInfo(
                commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
                commit_message=commit_message or "",
                commit_description="",
                oid="0" * 40,
            )

        def hf_hub_download(repo_id, filename, *args, **kwargs):  # ModelCard.load(repo_id)
            if remote_card is None or filename != "README.md":
                raise EntryNotFoundError(f"{filename} not in {repo_id}")
            path = Path(tmp_path) / "remote_README.md"
            path.write_text(remote_card)
            return str(path)

        def no_network(*args, **kwargs):
            raise RuntimeError("network access in a test")

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
        monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", hf_hub_download)
        monkeypatch.setattr(socket.socket, "connect", no_network)
        monkeypatch.setattr(socket, "getaddrinfo", no_network)

    @property
    def files(self) -> dict[str, bytes]:
        assert len(self.commits) == 1, [sorted(c["files"]) for c in self.commits]
        return self.commits[0]["files"]


def config_dict(config) -> dict:
    """The config's fields, without where it was loaded from."""
    return {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}


def assert_same_state(model_a, model_b) -> None:
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


# ---------------------------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained


@pytest.mark.parametrize("model_class", list(PIPELINE_TAGS), ids=lambda c: c.__name__)
def test_save_pretrained_writes_safetensors_config_and_code(tmp_path, model_class):
    model = model_class(tiny_config()).eval()
    model.save_pretrained(tmp_path)

    assert {p.name for p in tmp_path.iterdir()} == MODEL_FILES
    assert not [p for p in tmp_path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "locatvit" and config["architectures"] == [model_class.__name__]
    reloaded = model_class.from_pretrained(tmp_path)
    assert config_dict(reloaded.config) == config_dict(model.config)
    assert_same_state(model, reloaded)


def test_save_pretrained_keeps_an_existing_card(tmp_path):
    (tmp_path / "README.md").write_text("# my own card\n")
    LocAtViTForImageClassification(tiny_config()).save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my own card\n"


@pytest.mark.parametrize("task", ["image-classification", "semantic-segmentation"])
def test_image_processor_round_trip(tmp_path, task):
    processor = tiny_processor(task)
    processor.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == PROCESSOR_FILES
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is LocAtViTImageProcessor
    assert reloaded.to_dict() == processor.to_dict()


# ---------------------------------------------------------------------------------------------------------------------
# Pull: a real Hugging Face cache, read in offline mode

PULL = textwrap.dedent(
    """
    import sys
    if sys.argv[1] == "remote-code":
        sys.modules["locatvit_hf"] = None  # the package cannot be imported: the code comes from the cache
    else:
        import locatvit_hf
    import json

    import huggingface_hub
    import torch
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    assert huggingface_hub.constants.HF_HUB_OFFLINE
    assert huggingface_hub.constants.HF_HUB_CACHE.startswith(sys.argv[2]), huggingface_hub.constants.HF_HUB_CACHE
    kwargs = {"trust_remote_code": True} if sys.argv[1] == "remote-code" else {}
    model = AutoModelForSemanticSegmentation.from_pretrained("org/locatvit-tiny", **kwargs).eval()
    processor = AutoImageProcessor.from_pretrained("org/locatvit-tiny", **kwargs)
    expected = torch.load(sys.argv[3])
    state = model.state_dict()
    assert state.keys() == expected["state"].keys()
    assert all(torch.equal(state[k], v) for k, v in expected["state"].items())
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    assert config == expected["config"], (config, expected["config"])
    assert json.loads(processor.to_json_string()) == json.loads(expected["processor"])
    with torch.no_grad():
        logits = model(expected["pixel_values"], interpolate_pos_encoding=True).logits
    if sys.argv[1] == "remote-code":  # the pure-PyTorch path: the compiled kernel does not travel with the code
        torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(logits, expected["logits"])
    try:
        AutoModelForSemanticSegmentation.from_pretrained("org/not-in-the-cache", **kwargs)
    except OSError:
        pass
    else:
        raise SystemExit("a repo missing from the cache loaded")
    print("PULLED", type(model).__module__, type(processor).__module__)
    """
)


@pytest.mark.parametrize("mode", ["package", "remote-code"])
def test_pull_from_offline_hub_cache(tmp_path, mode):
    model = LocAtViTForSemanticSegmentation(tiny_config(id2label={i: f"class {i}" for i in range(5)})).eval()
    processor = tiny_processor("semantic-segmentation")
    repo = tmp_path / "repo"
    model.save_pretrained(repo)
    processor.save_pretrained(repo)
    hf_home = tmp_path / "hf_home"
    snapshot = fill_hub_cache(hf_home, "org/locatvit-tiny", repo)
    assert (snapshot / "model.safetensors").is_symlink()

    pixel_values = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        logits = model(pixel_values, interpolate_pos_encoding=True).logits
    expected = tmp_path / "expected.pt"
    torch.save(
        {
            "state": model.state_dict(),
            "config": config_dict(model.config),
            "processor": processor.to_json_string(),
            "pixel_values": pixel_values,
            "logits": logits,
        },
        expected,
    )
    code = PULL.replace("sys.argv[1]", repr(mode)).replace("sys.argv[2]", repr(str(hf_home)))
    result = run_offline(code.replace("sys.argv[3]", repr(str(expected))), hf_home, tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    prefix = "transformers_modules" if mode == "remote-code" else "locatvit_hf"
    assert f"PULLED {prefix}." in result.stdout, result.stdout
    assert result.stdout.count(prefix) == 2


# ---------------------------------------------------------------------------------------------------------------------
# Push: everything up to the HfApi boundary


def test_model_push_to_hub_hands_over_exactly_the_model_files(tmp_path, monkeypatch):
    hub = HubRecorder(monkeypatch)
    model = LocAtViTForSemanticSegmentation(tiny_config()).eval()
    model.push_to_hub("org/name")

    assert hub.repos == ["org/name"]
    files = hub.files
    assert set(files) == MODEL_FILES | {CARD}
    assert not [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    pushed = load_safetensors_bytes(files["model.safetensors"])
    assert pushed.keys() == model.state_dict().keys()
    assert all(torch.equal(pushed[key], value) for key, value in model.state_dict().items())
    assert json.loads(files["config.json"])["auto_map"]["AutoModelForSemanticSegmentation"].endswith(
        "LocAtViTForSemanticSegmentation"
    )
    source = Path(sys.modules["locatvit_hf"].__file__).parent
    for name in MODEL_CODE_FILES:
        assert files[name] == (source / name).read_bytes(), name

    # What was pushed loads back identically.
    folder = tmp_path / "pulled"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(folder)
    assert config_dict(reloaded.config) == config_dict(model.config)
    assert_same_state(model, reloaded)


def test_model_push_to_hub_to_a_new_repo_hands_over_transformers_card(monkeypatch):
    hub = HubRecorder(monkeypatch)
    LocAtViTForImageClassification(tiny_config()).push_to_hub("org/name")
    card = ModelCard(hub.files[CARD].decode())
    assert card.data.library_name == "transformers"


def test_image_processor_push_to_hub_hands_over_exactly_its_files(monkeypatch):
    hub = HubRecorder(monkeypatch)
    processor = tiny_processor("semantic-segmentation")
    processor.push_to_hub("org/name")
    # push_to_hub always adds the repo's card (a generic one for a new repo).
    assert set(hub.files) == PROCESSOR_FILES | {"README.md"}
    assert json.loads(hub.files["preprocessor_config.json"]) == json.loads(processor.to_json_string())


def test_save_pretrained_push_to_hub_uploads_the_model(tmp_path, monkeypatch):
    hub = HubRecorder(monkeypatch)
    model = LocAtViTForImageClassification(tiny_config())
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="org/name", private=True)

    assert hub.repos == ["org/name"]
    assert set(hub.files) - {CARD} == MODEL_FILES
    for name in MODEL_FILES:
        assert hub.files[name] == (tmp_path / "local" / name).read_bytes(), name


def test_save_pretrained_push_to_hub_keeps_the_repo_card(tmp_path, monkeypatch):
    remote_card = "---\nlicense: mit\n---\n\n# The card on the Hub\n"
    hub = HubRecorder(monkeypatch, remote_card=remote_card, tmp_path=tmp_path)
    LocAtViTForImageClassification(tiny_config()).save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="o/n")
    assert hub.files.get(CARD, remote_card.encode()).decode() == remote_card


def test_push_helpers_block_the_network(monkeypatch):
    HubRecorder(monkeypatch)
    with pytest.raises(RuntimeError, match="network"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    with pytest.raises(RuntimeError, match="network"):
        socket.getaddrinfo("huggingface.co", 443)
