"""The Hugging Face Hub without a network: SAEs load by repo id (subfolder, revision) from a local hub cache laid
out as huggingface_hub lays it out (HF_HUB_OFFLINE=1, under the tests' HF_HOME); push builds its files and model card
locally and hands them to one upload call (a fake api here)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from mlsae_cache.core.errors import InputError, NotFoundError
from mlsae_train.checkpoint import load_sae
from mlsae_train.cli import main
from mlsae_train.interop.hub import HubRef, parse_hub_ref
from mlsae_train.interop.push import PushConfig, run_push
from mlsae_train.results import EvalResult
from tests.interop.conftest import saved_sae

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(monkeypatch: pytest.MonkeyPatch) -> Path:
    """huggingface_hub's cache under this test session's HF_HOME (tests/conftest.py sets it), used offline."""
    import huggingface_hub.constants as constants

    root = Path(os.environ["HF_HOME"]) / "hub"
    shutil.rmtree(root, ignore_errors=True)  # HF_HOME is the session's: start each test from an empty hub cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root


def cache_repo(root: Path, repo_id: str, files: dict[str, Path], refs: tuple[str, ...] = ("main",)) -> None:
    """Put `files` (path in repo -> local file) into the hub cache as one commit: blobs named by their sha256,
    snapshot entries as relative symlinks to them, and refs naming the commit."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    for name, src in files.items():
        blob = repo / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, blob)
        link = repo / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(COMMIT)


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("hf://me/saes", HubRef("me/saes")),
        ("hf://me/saes/mlsae/x16@v1", HubRef("me/saes", "mlsae/x16", "v1")),
        ("me/saes@main", HubRef("me/saes", None, "main")),
        ("/abs/path", None),
        ("runs/a/b", None),
    ],
    ids=["hf", "subfolder-revision", "bare", "absolute", "relative"],
)
def test_parse_hub_ref(text: str, ref: HubRef | None) -> None:
    assert parse_hub_ref(text) == ref


def test_a_bad_hub_id_is_refused() -> None:
    with pytest.raises(InputError, match="is not a hub id"):
        parse_hub_ref("hf://justone")


def test_load_sae_from_the_hub_cache_by_id_subfolder_and_revision(hub_cache: Path, tmp_path: Path, cache: Path) -> None:
    sae_dir = saved_sae(tmp_path / "sae", cache, standardize=True)
    files = {f"mlsae/{p.name}": p for p in sae_dir.iterdir()}
    cache_repo(hub_cache, "me/saes", files, refs=("main", "v1"))
    cache_repo(hub_cache, "me/flat", {p.name: p for p in sae_dir.iterdir()})
    want = load_sae(sae_dir)[0].state_dict()
    for name in ("hf://me/saes/mlsae", "hf://me/saes/mlsae@v1", f"hf://me/saes/mlsae@{COMMIT}", "me/flat"):
        got = load_sae(name)[0].state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), name
    result = CliRunner().invoke(main, ["--quiet", "export", "hf://me/saes/mlsae", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "blocks.0.hook_resid_post" / "sae_weights.safetensors").is_file()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("hf://me/absent", "cannot get hf://me/absent from the Hugging Face Hub"),
        ("hf://me/saes/nothing", "has no folder 'nothing'"),
        ("hf://me/saes/mlsae@v9", "cannot get hf://me/saes/mlsae@v9"),
    ],
    ids=["not-cached", "no-subfolder", "no-revision"],
)
def test_what_the_hub_cache_lacks_is_one_line(
    hub_cache: Path, tmp_path: Path, cache: Path, name: str, message: str
) -> None:
    sae_dir = saved_sae(tmp_path / "sae", cache, standardize=True)
    cache_repo(hub_cache, "me/saes", {f"mlsae/{p.name}": p for p in sae_dir.iterdir()})
    with pytest.raises(NotFoundError, match=message) as info:
        load_sae(name)
    assert "\n" not in str(info.value)


class FakeApi:
    """Records what push gives huggingface_hub: the repo it creates and the folder it uploads (read at call time)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.files: dict[str, bytes] = {}

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs: Any) -> str:
        self.calls.append(("upload_folder", kwargs))
        self.files = {p.name: p.read_bytes() for p in Path(kwargs["folder_path"]).iterdir()}
        return "commit"


def eval_result(path: Path) -> Path:
    result = EvalResult(
        layer=[0, 1, 2], fvu=[0.31, 0.25, 0.4], mse=[1.0, 2.0, 3.0], l0=[4.0, 4.0, 4.0], n_rows=[10, 10, 10],
        dead_fraction=0.05, fvu_mean=0.32, delta_ce=[0.11, 0.22, 0.33], delta_ce_mean=0.22, n_predicted=99,
        sae="/home/me/runs/sae", cache="/home/me/runs/cache",
    )  # fmt: skip
    return result.write(path)


def test_push_uploads_weights_public_cfg_eval_and_card_in_one_call(tmp_path: Path, cache: Path) -> None:
    sae_dir = saved_sae(tmp_path / "sae", cache, standardize=True)
    (sae_dir / "trainer_state.pt").write_bytes(b"optimiser state")
    api = FakeApi()
    cfg = PushConfig(sae_dir, "me/saes/mlsae@main", eval=eval_result(tmp_path / "eval.json"), private=True)
    assert run_push(cfg, api) == ["README.md", "cfg.json", "eval.json", "sae.safetensors"]
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "me/saes", "private": True, "exist_ok": True}
    upload = api.calls[1][1]
    assert (upload["repo_id"], upload["path_in_repo"], upload["revision"]) == ("me/saes", "mlsae", "main")
    assert sorted(api.files) == ["README.md", "cfg.json", "eval.json", "sae.safetensors"]
    assert api.files["sae.safetensors"] == (sae_dir / "sae.safetensors").read_bytes()
    pushed = json.loads(api.files["cfg.json"])
    assert "cache_path" not in pushed and pushed["cache_fingerprint"] and pushed["layers"] == [0, 1, 2]
    assert str(tmp_path) not in api.files["cfg.json"].decode() + api.files["eval.json"].decode()
    card = api.files["README.md"].decode()
    for needed in ("library_name: mlsae", "2409.04185", "`tiny`", "layers 0, 1, 2", "| 1 | 0.2500 | 4.0 | 0.2200 |"):
        assert needed in card, needed
    assert "never trained on" in card and "| k | `4` |" in card


def test_push_to_a_folder_writes_the_same_files(tmp_path: Path, cache: Path) -> None:
    sae_dir = saved_sae(tmp_path / "sae", cache, standardize=True)
    result = CliRunner().invoke(main, ["--quiet", "push", str(sae_dir), "me/saes", "--to-folder", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["README.md", "cfg.json", "sae.safetensors"]
    assert load_sae(tmp_path / "f")[0].cfg == load_sae(sae_dir)[0].cfg
    again = CliRunner().invoke(main, ["--quiet", "push", str(sae_dir), "me/saes", "--to-folder", str(tmp_path / "f")])
    assert again.exit_code == 2 and "is not empty" in again.output and again.output.count("\n") == 1


def test_encode_and_index_take_a_hub_id(hub_cache: Path, tmp_path: Path, cache: Path) -> None:
    from mlsae_analyze.cli import main as analyze

    sae_dir = saved_sae(tmp_path / "sae", cache, standardize=True)
    cache_repo(hub_cache, "me/saes", {f"mlsae/{p.name}": p for p in sae_dir.iterdir()})
    runner = CliRunner()
    for sae, out in ((str(sae_dir), "local"), ("hf://me/saes/mlsae", "hub")):
        result = runner.invoke(analyze, ["encode", sae, str(cache), str(tmp_path / out), "--device", "cpu"])
        assert result.exit_code == 0, result.output
    from mlsae_analyze.latents import Latents

    local, hub = Latents(tmp_path / "local"), Latents(tmp_path / "hub")
    assert local.meta.sae_fingerprint == hub.meta.sae_fingerprint
    a, b = local.chunk(0, 10**9), hub.chunk(0, 10**9)
    assert (a.indices == b.indices).all() and (a.values == b.values).all()
    assert runner.invoke(analyze, ["variance", str(tmp_path / "hub"), str(tmp_path / "var")]).exit_code == 0
    args = ["index", str(tmp_path / "hub"), str(tmp_path / "idx"), "--variance", str(tmp_path / "var")]
    result = runner.invoke(analyze, [*args, "--sae", "hf://me/saes/mlsae", "--no-logits"])
    assert result.exit_code == 0, result.output
