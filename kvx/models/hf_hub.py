"""Models named by Hugging Face id: `--model Qwen/Qwen2.5-7B-Instruct[@revision]`.

The files come through huggingface_hub into its standard cache ($HF_HOME/hub, or $HF_HUB_CACHE), so
every other tool on the machine shares them. Only what kvx loads is fetched (config, safetensors,
tokenizer, chat template) under the names kvx reads (model.safetensors or model-0000i-of-0000n shards),
never the repository's other weight formats or consolidated copies. HF_HUB_OFFLINE=1 is honoured:
a model that is not cached then fails with one line saying so, and nothing is downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

from kvx.errors import KvxError

# ORG/NAME with Hugging Face's characters, then an optional @revision (a branch, tag or commit).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_])(?:@(?P<rev>[\w./-]+))?$")

_FILES = [
    "config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json",
]


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) if `text` reads as ORG/NAME[@revision]; None if it does not."""
    m = _HUB_ID.match(text)
    if m is None or ".." in m.group("repo"):
        return None
    return m.group("repo"), m.group("rev")


def resolve_hub_model(repo_id: str, revision: str | None = None, quiet: bool = False,
                      files: list[str] | None = None) -> Path:
    """The local snapshot folder of repo_id at revision, downloading what kvx needs unless offline."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise KvxError("--model ORG/NAME needs huggingface_hub: pip install huggingface_hub") from None

    offline = bool(constants.HF_HUB_OFFLINE)
    name = repo_id + (f"@{revision}" if revision else "")
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=files or _FILES,
                                   local_files_only=offline)
    except hub_errors.LocalEntryNotFoundError:
        where = constants.HF_HUB_CACHE
        if offline:
            raise KvxError(f"model {name} is not in the Hugging Face cache ({where}) and HF_HUB_OFFLINE=1 "
                           "forbids downloading it; download it once online, or unset HF_HUB_OFFLINE") from None
        raise KvxError(f"model {name} could not be downloaded (no connection to the Hub?) and is not in "
                       f"the Hugging Face cache ({where})") from None
    except hub_errors.GatedRepoError:
        raise KvxError(f"model {name} is gated: accept its licence on huggingface.co and log in "
                       "(hf auth login, or set HF_TOKEN)") from None
    except hub_errors.RepositoryNotFoundError:
        raise KvxError(f"model {name} not found on the Hugging Face Hub (private? then log in, or set "
                       "HF_TOKEN)") from None
    except hub_errors.RevisionNotFoundError:
        raise KvxError(f"model {repo_id} has no revision {revision!r}") from None
    except hub_errors.HfHubHTTPError as exc:
        raise KvxError(f"cannot fetch model {name}: {_first_line(exc)}") from None
    except (OSError, ValueError) as exc:  # a full disk, an unwritable cache, a malformed id
        raise KvxError(f"cannot fetch model {name}: {_first_line(exc)}") from None
    return Path(folder)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
