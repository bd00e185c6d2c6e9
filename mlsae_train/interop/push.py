"""`mlsae-train push SAE REPO`: upload an SAE's weights, its cfg.json without local paths, an eval table and a
generated model card to the Hugging Face Hub. The folder is prepared without a network (and can be written out
instead of uploaded); the upload is one `huggingface_hub` call (hub.upload). The trainer state is never uploaded."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlsae_cache.core.errors import InputError
from mlsae_cache.core.outputs import follow_umask
from mlsae_train.checkpoint import CFG_NAME, WEIGHTS_NAME, load_sae, resolve_sae
from mlsae_train.interop.hub import PREFIX, HubRef, parse_hub_ref, upload
from mlsae_train.interop.modelcard import model_card
from mlsae_train.interop.provenance import provenance, public_cfg
from mlsae_train.lens import SAE_LENS_DIR, has_lens
from mlsae_train.lens import WEIGHTS_NAME as LENS_WEIGHTS
from mlsae_train.results import EvalResult

EVAL_NAME = "eval.json"
CARD_NAME = "README.md"


@dataclass(frozen=True)
class PushConfig:
    """Everything `mlsae-train push` takes; CLI options map one-to-one onto these fields."""

    sae: str | Path
    repo: str
    eval: Path | None = None
    cache: Path | None = None
    private: bool = False
    message: str = "Upload an mlsae SAE"
    to_folder: Path | None = None
    allow_unfinished: bool = False


def hub_target(repo: str) -> HubRef:
    """The hub folder `owner/name[/subfolder][@revision]` (or the same with hf://) names."""
    ref = parse_hub_ref(repo if repo.startswith(PREFIX) else PREFIX + repo)
    assert ref is not None
    return ref


def prepare(cfg: PushConfig, folder: Path) -> list[str]:
    """Fill `folder` with what `push` uploads; returns the file names. Reads and writes only local files."""
    ref = hub_target(cfg.repo)
    _, sae_cfg = load_sae(cfg.sae, "cpu", cfg.allow_unfinished)  # validates the checkpoint
    result = EvalResult.read(cfg.eval) if cfg.eval is not None else None
    public = public_cfg(sae_cfg)
    shutil.copyfile(resolve_sae(cfg.sae) / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    (folder / CFG_NAME).write_text(json.dumps(public, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    if has_lens(sae_cfg):  # the lens travels with the SAE, as in the SAE directory, without local paths
        src, dst = resolve_sae(cfg.sae) / SAE_LENS_DIR, folder / SAE_LENS_DIR
        dst.mkdir()
        shutil.copyfile(src / LENS_WEIGHTS, dst / LENS_WEIGHTS)
        lens_cfg = public_cfg(json.loads((src / CFG_NAME).read_text(encoding="utf-8")))
        (dst / CFG_NAME).write_text(json.dumps(lens_cfg, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        for path in dst.iterdir():
            follow_umask(path)
    if result is not None:
        dataclasses.replace(result, sae=None, cache=None).write(folder / EVAL_NAME)
    title = ref.repo_id + (f"/{ref.subfolder}" if ref.subfolder else "")
    card = model_card(title, public, provenance(sae_cfg, cfg.cache), result)
    (folder / CARD_NAME).write_text(card, encoding="utf-8")
    for path in folder.iterdir():
        follow_umask(path)
    return sorted(p.name for p in folder.iterdir())


def run_push(cfg: PushConfig, api: Any = None) -> list[str]:
    """Prepare the folder and upload it (or write it to cfg.to_folder); returns the file names. `api` stands in for
    `huggingface_hub.HfApi()`."""
    if cfg.to_folder is not None:
        return _to_folder(cfg, Path(cfg.to_folder))
    with tempfile.TemporaryDirectory(prefix="mlsae-push-") as tmp:
        files = prepare(cfg, Path(tmp))
        upload(Path(tmp), hub_target(cfg.repo), cfg.message, cfg.private, api)
    return files


def _to_folder(cfg: PushConfig, out: Path) -> list[str]:
    """Write the files into the empty or new directory `out`; a refused SAE, cache or eval leaves it as it was."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--to-folder {out} is a file (choose an empty or new directory)")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--to-folder {out} is not empty (choose an empty or new directory)")
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return prepare(cfg, out)
    except BaseException:
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        if made:
            out.rmdir()
        raise
