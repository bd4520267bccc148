"""`--model ORG/NAME[@revision]` through huggingface_hub's standard cache, offline, against a cache the
test builds itself (the layout huggingface_hub writes: models--ORG--NAME/{refs,snapshots}). No network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import make_model_folder
from kvx.errors import KvxError
from kvx.models.hf_hub import parse_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "tiny-org/tiny-llama"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """HF_HOME with REPO cached at COMMIT, reachable as main, as tag v1 and by the commit itself."""
    home = tmp_path_factory.mktemp("hf")
    model = make_model_folder(tmp_path_factory.mktemp("src"))
    repo = home / "hub" / ("models--" + REPO.replace("/", "--"))
    shutil.copytree(model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    for ref in ("main", "v1"):
        (repo / "refs" / ref).write_text(COMMIT)
    return home


def kvx(*args: str, env: dict, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ, OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", "kvx", *args], capture_output=True, text=True, env=full,
                          cwd=cwd, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvx: error:") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_hub_ids_are_recognised():
    assert parse_hub_id("Qwen/Qwen2.5-7B-Instruct") == ("Qwen/Qwen2.5-7B-Instruct", None)
    assert parse_hub_id("meta-llama/Llama-3.1-8B@main") == ("meta-llama/Llama-3.1-8B", "main")
    assert parse_hub_id(f"{REPO}@{COMMIT}") == (REPO, COMMIT)
    assert parse_hub_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    for not_an_id in ("/abs/path", "a/b/c", "name", "org/", "/name", "org/name@", "../x", "org/na me", "a/..", ""):
        assert parse_hub_id(not_an_id) is None, not_an_id


@pytest.fixture
def hub(hf_home, monkeypatch):
    """huggingface_hub in this process pointed at the test's cache, offline (as HF_HOME and
    HF_HUB_OFFLINE=1 would set it at import); returns a function setting offline mode."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return lambda offline: monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


def test_generate_offline_from_the_cache(hf_home):
    """End to end, configured the way a user configures it: environment variables."""
    proc = kvx("generate", "--model", REPO, "--raw", "-n", "3", "--json", "hello",
               env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["prompt_tokens"] == 5
    line = one_error_line(kvx("generate", "--model", "tiny-org/absent", "hi",
                              env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}))
    assert "tiny-org/absent" in line and "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE" in line


@pytest.mark.parametrize("model", [REPO, f"{REPO}@main", f"{REPO}@v1", f"{REPO}@{COMMIT}"])
def test_branches_tags_and_commits_resolve_offline(hub, hf_home, model):
    from kvx.models.hub import model_name, resolve_model

    folder = resolve_model(model)
    assert folder == hf_home / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    assert model_name(model, folder) == model  # results record the id, not the commit folder


@pytest.mark.parametrize("model", ["tiny-org/absent", f"{REPO}@v2", f"{REPO}@{'f' * 40}"])
def test_not_cached_and_offline_is_one_line(hub, model):
    from kvx.models.hub import resolve_model

    with pytest.raises(KvxError) as info:
        resolve_model(model)
    message = str(info.value)
    assert model in message and "HF_HUB_OFFLINE" in message and "\n" not in message


def test_unreachable_hub_falls_back_to_the_cache(hub, hf_home, monkeypatch):
    # Online, but the Hub cannot be reached: huggingface_hub serves the cached snapshot, and a model that
    # is not cached fails with one line (nothing half-downloaded left behind).
    from huggingface_hub import constants

    from kvx.models.hub import resolve_model

    hub(False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert resolve_model(REPO).name == COMMIT
    with pytest.raises(KvxError, match="could not be downloaded"):
        resolve_model("tiny-org/absent")
    assert not (hf_home / "hub" / "models--tiny-org--absent" / "snapshots").exists()


def test_a_local_folder_of_the_same_shape_wins(hf_home, tmp_path, monkeypatch):
    from kvx.models import hf_hub
    from kvx.models.hub import resolve_model

    local = tmp_path / "tiny-org" / "tiny-llama"
    shutil.copytree(hf_home / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT, local)
    monkeypatch.chdir(tmp_path)

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked although a local folder exists")

    monkeypatch.setattr(hf_hub, "resolve_hub_model", no_hub)
    assert resolve_model(REPO) == Path(REPO)
    with pytest.raises(KvxError, match="model folder not found"):
        resolve_model("./tiny-org/absent")
