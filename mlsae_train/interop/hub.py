"""SAEs on the Hugging Face Hub: a repo id (with a subfolder and a revision) wherever an SAE directory is taken,
downloaded through `huggingface_hub.snapshot_download` into its cache (so HF_HOME and HF_HUB_OFFLINE apply), and the
upload of a folder that `push` prepares, in one `upload_folder` call.

An SAE argument names the hub when it starts with `hf://` (`hf://owner/name[/subfolder][@revision]`), or when it is
a bare `owner/name[@revision]` and no local path of that name exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlsae_cache.core.errors import InputError, NotFoundError

PREFIX = "hf://"
_BARE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[^@\s]+)?$")
_PART = re.compile(r"^[A-Za-z0-9][\w.-]*$")
NEVER_DOWNLOADED = ["trainer_state.pt", "*/trainer_state.pt"]


@dataclass(frozen=True)
class HubRef:
    """A folder of a hub model repository: repo_id `owner/name`, an optional subfolder and revision."""

    repo_id: str
    subfolder: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"{PREFIX}{self.repo_id}{sub}" + (f"@{self.revision}" if self.revision else "")


def parse_hub_ref(text: str) -> HubRef | None:
    """The hub folder `text` names, or None for a local path (see the module docstring)."""
    if text.startswith(PREFIX):
        body = text[len(PREFIX) :]
    elif _BARE.match(text) and not Path(text).exists():
        body = text
    else:
        return None
    body, _, revision = body.partition("@")
    parts = body.strip("/").split("/")
    if len(parts) < 2 or not all(_PART.match(p) for p in parts):
        raise InputError(f"{text!r} is not a hub id (write hf://owner/name[/subfolder][@revision])")
    return HubRef("/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None)


def download(ref: HubRef, text: str = "") -> Path:
    """The local folder of `ref` in the hub cache, downloaded first if needed (and allowed: HF_HUB_OFFLINE=1 reads
    the cache only)."""
    from huggingface_hub import snapshot_download

    allow = [f"{ref.subfolder}/*"] if ref.subfolder else None
    try:
        root = snapshot_download(
            ref.repo_id, revision=ref.revision, allow_patterns=allow, ignore_patterns=NEVER_DOWNLOADED
        )
    except Exception as e:  # huggingface_hub raises its own types: not found, offline, no such revision
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        local = "" if text.startswith(PREFIX) else f"{text} is no local path, and "
        raise NotFoundError(
            f"{local}cannot get {ref} from the Hugging Face Hub: {first} (check the path, or the id and revision; "
            "offline, download it once online)"
        ) from e
    folder = Path(root) / ref.subfolder if ref.subfolder else Path(root)
    if not folder.is_dir():
        raise NotFoundError(f"{ref} has no folder {ref.subfolder!r} (check the subfolder)")
    return folder


def local_sae_dir(path: str | Path) -> Path:
    """`path` itself, or the local folder of the hub folder it names."""
    ref = parse_hub_ref(str(path))
    return Path(path) if ref is None else download(ref, str(path))


def upload(folder: Path, ref: HubRef, message: str, private: bool, api: Any = None) -> Any:
    """Create the repo if needed and upload every file of `folder` into ref's subfolder, in one commit; returns
    huggingface_hub's commit info. `api` stands in for `huggingface_hub.HfApi()` (tests pass a fake)."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(ref.repo_id, private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=ref.repo_id,
        folder_path=str(folder),
        path_in_repo=ref.subfolder or "",
        revision=ref.revision,
        commit_message=message,
    )
