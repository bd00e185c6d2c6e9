"""A full disk: harvest, encode, fit's checkpoints and index stop with one line naming their output, leave what
they committed valid, and the same command finishes the work once space is freed, equal to a run that never
stopped.

Each test writes its output on a small tmpfs that it mounts (root only: CI runs as root) and grows afterwards;
where no tmpfs can be mounted the tests are skipped, saying why.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner, Result

from mlsae_analyze.cli import main as analyze_main
from mlsae_analyze.explorer.index import ExplorerIndex
from mlsae_analyze.latents import Latents
from mlsae_cache.cli import main as cache_main
from mlsae_cache.store import read_meta
from mlsae_train.checkpoint import CFG_NAME, WEIGHTS_NAME, load_sae, save_sae
from mlsae_train.cli import main as train_main
from mlsae_train.sae import SaeConfig, TopKSAE
from mlsae_train.state import METRICS_NAME, STATE_NAME, save_state, truncate_metrics
from tests.cache.test_resume import assert_same_store
from tests.explorer.stores import Stores, make_stores
from tests.train.test_trainer import assert_same_weights


@dataclass(frozen=True)
class SmallDisk:
    """A tmpfs mounted at `path`."""

    path: Path

    def resize(self, kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(self.path)], check=True)

    def leftovers(self) -> list[str]:
        """Temporary and partial files of interrupted writes still on the disk."""
        return sorted(str(p) for p in self.path.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial"))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root and mount(8)")
    path = tmp_path / "disk"
    path.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield SmallDisk(path)
    finally:
        gc.collect()  # mappings of files on the disk (safetensors) go with their arrays
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=True)


def run(main: click.Group, *args: str) -> Result:
    return CliRunner().invoke(main, ["--quiet", *map(str, args)])


def assert_full_disk_line(result: Result, out: Path) -> None:
    """Exit 1 and one line on stderr naming `out`, no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [
        f"Error: the disk is full writing {out} (free space on that disk, then re-run the same command)"
    ]


HARVEST = ["--context-length", "32", "--batch-size", "4", "--chunk-tokens", "128", "--max-tokens", "2000"]


def test_harvest_stops_cleanly_and_resumes(tmp_path: Path, small_disk: SmallDisk, tiny_models: dict) -> None:
    opts = [*HARVEST, "--model", str(tiny_models["llama"]), "--device", "cpu", "--dtype", "float32"]
    assert run(cache_main, "harvest", tmp_path / "reference", *opts).exit_code == 0
    out = small_disk.path / "cache"
    assert_full_disk_line(run(cache_main, "harvest", out, *opts), out)
    committed = read_meta(out)
    assert 0 < committed.n_tokens < 2000 and not committed.complete
    assert run(cache_main, "verify", out).exit_code == 0
    assert small_disk.leftovers() == []
    small_disk.resize(8 * 1024)
    assert run(cache_main, "harvest", out, *opts).exit_code == 0
    assert_same_store(out, tmp_path / "reference")


@pytest.fixture
def stores(tmp_path: Path) -> Stores:
    return make_stores(tmp_path / "stores", chunk_tokens=64)


def test_encode_stops_cleanly_and_resumes(tmp_path: Path, small_disk: SmallDisk, stores: Stores) -> None:
    encode = ["encode", stores.sae, stores.cache]
    assert run(analyze_main, *encode, tmp_path / "reference", "--device", "cpu").exit_code == 0
    out = small_disk.path / "latents"
    small_disk.resize(64)
    assert_full_disk_line(run(analyze_main, *encode, out, "--device", "cpu"), out)
    committed = Latents(out, require_complete=False)
    assert 0 < committed.n_tokens < 640 and not committed.meta.complete
    assert committed.verify() > 0
    assert small_disk.leftovers() == []
    small_disk.resize(4 * 1024)
    assert run(analyze_main, *encode, out, "--device", "cpu").exit_code == 0
    assert_same_store(out, tmp_path / "reference")


FIT = [
    *("--expansion-factor", "64", "--k", "4", "--batch-rows", "128", "--max-rows", "3000"),
    *("--checkpoint-every-rows", "1000", "--block-units", "4", "--log-every-steps", "1", "--device", "cpu"),
]


def test_fit_checkpoint_stops_cleanly_and_resumes(tmp_path: Path, small_disk: SmallDisk, random_cache: Path) -> None:
    assert run(train_main, "fit", random_cache, tmp_path / "reference", *FIT).exit_code == 0
    state, weights = ((tmp_path / "reference" / name).stat().st_size for name in (STATE_NAME, WEIGHTS_NAME))
    # room for the first checkpoint, not for the second: the trainer state is written beside the one it replaces
    small_disk.resize((state + weights + state // 2 + 32 * 1024) // 1024)
    out = small_disk.path / "sae"
    assert_full_disk_line(run(train_main, "fit", random_cache, out, *FIT), out)
    _, cfg = load_sae(out, allow_unfinished=True)  # the first checkpoint, whole
    assert cfg["rows_trained"] == 1024 and not cfg["finished"]
    assert sorted(p.name for p in out.iterdir()) == sorted([CFG_NAME, METRICS_NAME, WEIGHTS_NAME, STATE_NAME])
    small_disk.resize(16 * 1024)
    assert run(train_main, "fit", random_cache, out, *FIT).exit_code == 0
    assert_same_weights(out, tmp_path / "reference")
    lines = [(run_dir / METRICS_NAME).read_text().splitlines() for run_dir in (out, tmp_path / "reference")]
    assert [_without_rate(line) for line in lines[0]] == [_without_rate(line) for line in lines[1]]


def _without_rate(line: str) -> dict:
    return {k: v for k, v in json.loads(line).items() if k != "rows_per_s"}


def test_a_checkpoint_file_on_a_full_disk_is_an_os_error_naming_it(small_disk: SmallDisk) -> None:
    """torch.save and safetensors report a full disk in their own ways; both reach the CLI as OSError(ENOSPC)."""
    sae = TopKSAE(SaeConfig(d_model=64, n_latents=4096, k=4))
    small_disk.resize(256)
    out = small_disk.path / "sae"
    with pytest.raises(OSError, match="No space left") as raised:
        save_sae(sae, out)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(out / WEIGHTS_NAME)
    with pytest.raises(OSError, match="No space left") as raised:
        save_state(out, {"model": sae.state_dict()})
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(out / STATE_NAME)
    assert list(out.iterdir()) == []


def test_index_stops_cleanly_and_builds_again(tmp_path: Path, small_disk: SmallDisk, stores: Stores) -> None:
    index = ["index", stores.latents, "--variance", stores.variance, "--sae", stores.sae, "--no-logits"]
    assert run(analyze_main, *index[:2], tmp_path / "reference", *index[2:]).exit_code == 0
    out = small_disk.path / "index"
    small_disk.resize(64)
    assert_full_disk_line(run(analyze_main, *index[:2], out, *index[2:]), out)
    assert list(small_disk.path.iterdir()) == []  # neither the index nor its temporary directory
    small_disk.resize(4 * 1024)
    assert run(analyze_main, *index[:2], out, *index[2:]).exit_code == 0
    built, reference = ExplorerIndex(out).arrays(), ExplorerIndex(tmp_path / "reference").arrays()
    for name, a, b in zip(built._fields, built, reference, strict=True):
        if isinstance(a, np.ndarray):
            assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
        else:
            assert a == b, name


def test_a_metrics_line_cut_short_is_dropped_on_resume(tmp_path: Path) -> None:
    """A full disk can stop the metrics log mid-line; the run that continues drops that line with the others
    written after its checkpoint."""
    lines = [json.dumps({"step": step, "fvu": 0.5}) for step in range(4)]
    path = tmp_path / METRICS_NAME
    path.write_text("\n".join(lines) + "\n" + lines[3][:7])
    truncate_metrics(path, 2)
    assert path.read_text().splitlines() == lines[:3]
