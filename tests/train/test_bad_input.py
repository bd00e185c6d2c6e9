"""Bad input to every `mlsae-train` command: one `Error: ...` line, exit 2 for input (1 for runtime), no traceback,
nothing created or changed (tests/badinput.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlsae_train.cli import main
from mlsae_train.lens import Lens, save_lens
from tests.badinput import Case, World, case, check, flip_byte, make_world


def _lenses(root: Path) -> dict[str, Path]:
    """A lens of the world's cache (blocks 0-3, width 32) and broken copies of it."""
    g = torch.Generator().manual_seed(0)
    lens = Lens((0, 1, 2, 3), 0.1 * torch.randn(4, 32, 32, generator=g), torch.zeros(4, 32))
    paths = {}
    for name in ("lens", "cfg-garbage", "future-version", "weights-truncated", "weights-flipped", "weights-missing"):
        paths[name] = save_lens(lens, root / name, {"finished": True})
    (paths["cfg-garbage"] / "cfg.json").write_text("{not json")
    cfg = json.loads((paths["future-version"] / "cfg.json").read_text())
    (paths["future-version"] / "cfg.json").write_text(json.dumps({**cfg, "version": 99}))
    weights = paths["weights-truncated"] / "lens.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    flip_byte(paths["weights-flipped"] / "lens.safetensors", 0.9)
    (paths["weights-missing"] / "lens.safetensors").unlink()
    return {f"lens:{k}" if k != "lens" else k: v for k, v in paths.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> World:
    w = make_world(tmp_path_factory.mktemp("bad-train"))
    w.paths.update(_lenses(w.root / "lenses"))
    w.paths["llama"] = tiny_models["llama"]
    (w.root / "eval-garbage.json").write_text("{not json")
    w.paths["eval-garbage"] = w.root / "eval-garbage.json"
    (w.root / "preset.toml").write_text("[fit\n")
    w.paths["preset-garbage"] = w.root / "preset.toml"
    return w


CACHE_ARG = {  # name: (path, a fragment of the error, exit code)
    "missing": ("{missing}", "does not exist", 2),
    "empty-dir": ("{empty-dir}", "an empty directory, not an mlsae cache", 2),
    "a-file": ("{text-file}", "a file, not an mlsae cache", 2),
    "an-sae": ("{sae}", "SAE checkpoint, not an mlsae cache", 2),
    "a-latents-store": ("{latents}", "latents store, not an mlsae cache", 2),
    "root-garbage": ("{cache-root-garbage}", "zarr.json is unreadable", 2),
    "future-version": ("{cache-future-version}", "format version 99", 2),
    "array-missing": ("{cache-array-missing}", "activations/zarr.json is missing or unreadable", 1),
}
SAE_ARG = {
    "missing": ("{missing}", "does not exist"),
    "empty-dir": ("{empty-dir}", "an empty directory, not an SAE checkpoint"),
    "a-cache": ("{cache}", "an mlsae cache, not an SAE checkpoint"),
    "cfg-missing": ("{sae-cfg-missing}", "not an SAE checkpoint"),
    "cfg-garbage": ("{sae-cfg-garbage}", "cfg.json is not valid JSON"),
    "cfg-not-object": ("{sae-cfg-not-object}", "expected 'mlsae-sae'"),
    "future-version": ("{sae-future-version}", "version 99"),
    "cfg-no-k": ("{sae-cfg-no-k}", "lacks k"),
    "k-text": ("{sae-k-text}", "'four'"),
    "d-model-wrong": ("{sae-d-model-wrong}", "different checkpoints"),
    "weights-missing": ("{sae-weights-missing}", "has no sae.safetensors"),
    "weights-truncated": ("{sae-weights-truncated}", "not a readable safetensors file"),
    "weights-header-flipped": ("{sae-weights-header-flipped}", "not a readable safetensors file"),
    "weights-empty": ("{sae-weights-empty}", "not a readable safetensors file"),
}
FIT_OPTS = ("--expansion-factor", "1", "--k", "2", "--batch-rows", "64", "--max-rows", "128", "--device", "cpu")
F = ("fit", "{cache}", "{out}", *FIT_OPTS)
FIT = [
    *(case(f"cache-{k}", "fit", v, "{out}", *FIT_OPTS, message=m, code=code) for k, (v, m, code) in CACHE_ARG.items()),
    case("k-0", *F, "--k", "0", message="--k"),
    case("k-more-than-latents", *F, "--k", "100", message="--k"),
    case("expansion-factor-0", *F, "--expansion-factor", "0", message="--expansion-factor"),
    case("batch-rows-0", *F, "--batch-rows", "0", message="--batch-rows"),
    case("lr-negative", *F, "--lr", "-1", message="--lr"),
    case("lr-nan", *F, "--lr", "nan", message="--lr"),
    case("max-rows-0", *F, "--max-rows", "0", message="--max-rows"),
    case("layers-not-in-cache", *F, "--layers", "0,9", message="9"),
    case("device-unknown", *F, "--device", "tpu", message="--device"),
    case("out-a-file", "fit", "{cache}", "{text-file}", *FIT_OPTS, message="is a file"),
    case("out-a-cache", "fit", "{cache}", "{cache}", *FIT_OPTS, message="holds no mlsae training run"),
    case("out-a-foreign-dir", "fit", "{cache}", "{stores}", *FIT_OPTS, message="holds no mlsae training run"),
    case("resume-nothing", *F, "--resume", message="holds no training run to continue"),
    case("lens-missing", *F, "--lens", "{missing}", message="does not exist"),
    case("lens-an-sae", *F, "--lens", "{sae}", message="not an mlsae lens"),
    case("lens-truncated", *F, "--lens", "{lens:weights-truncated}", message="cannot read"),
    case("config-not-toml", *F, "--config", "{preset-garbage}", message="--config"),
]
E = ("--device", "cpu")
EVAL = [
    *(case(f"sae-{k}", "eval", v, "{cache}", *E, message=m) for k, (v, m) in SAE_ARG.items()),
    *(case(f"cache-{k}", "eval", "{sae}", v, *E, message=m, code=code) for k, (v, m, code) in CACHE_ARG.items()),
    case("layers-not-in-sae", "eval", "{sae}", "{cache}", *E, "--layers", "7", message="are not in cache"),
    case(
        "start-after-stop",
        "eval",
        "{sae}",
        "{cache}",
        *E,
        "--start",
        "500",
        "--stop",
        "100",
        message="--stop 100 must be greater",
    ),
    case("start-past-end", "eval", "{sae}", "{cache}", *E, "--start", "10k", message="is empty"),
    case("splice-imported-cache", "eval", "{sae}", "{cache}", *E, "--model-splice", message="names no model"),
]
L = ("--model", "{llama}", "--max-tokens", "128", "--device", "cpu")
LENS = [
    *(case(f"cache-{k}", "lens", v, "{out}", *L, message=m, code=code) for k, (v, m, code) in CACHE_ARG.items()),
    case("imported-cache-no-model", "lens", "{cache}", "{out}", "--device", "cpu", message="--model"),
    case("model-missing", "lens", "{cache}", "{out}", *L, "--model", "{missing}", message="does not exist"),
    case("model-a-cache", "lens", "{cache}", "{out}", *L, "--model", "{cache}", message="could not load model"),
    case("epochs-0", "lens", "{cache}", "{out}", *L, "--epochs", "0", message="--epochs"),
    case("batch-tokens-0", "lens", "{cache}", "{out}", *L, "--batch-tokens", "0", message="--batch-tokens"),
    case("lr-negative", "lens", "{cache}", "{out}", *L, "--lr", "-1", message="--lr"),
]
EL = ("--model", "{llama}", "--device", "cpu")
EVAL_LENS = [
    case("lens-cfg-garbage", "eval-lens", "{lens:cfg-garbage}", "{cache}", *EL, message="is not valid JSON"),
    case("lens-future-version", "eval-lens", "{lens:future-version}", "{cache}", *EL, message="version 99"),
    case("lens-weights-truncated", "eval-lens", "{lens:weights-truncated}", "{cache}", *EL, message="cannot read"),
    case("lens-weights-missing", "eval-lens", "{lens:weights-missing}", "{cache}", *EL, message="cannot read"),
    case("lens-missing", "eval-lens", "{missing}", "{cache}", *EL, message="does not exist"),
    case("lens-an-sae", "eval-lens", "{sae}", "{cache}", *EL, message="not an mlsae lens"),
    case("lens-a-cache", "eval-lens", "{cache}", "{cache}", *EL, message="not a lens"),
    *(case(f"cache-{k}", "eval-lens", "{lens}", v, *EL, message=m, code=code) for k, (v, m, code) in CACHE_ARG.items()),
]
EXPORT = [
    *(case(f"sae-{k}", "export", v, "{out}", message=m) for k, (v, m) in SAE_ARG.items()),
    case("layers-not-in-sae", "export", "{sae}", "{out}", "--layers", "9", message="are not layers"),
    case("format-unknown", "export", "{sae}", "{out}", "--format", "onnx", message="--format"),
    case("out-a-file", "export", "{sae}", "{text-file}", message="is a file"),
    case(
        "cache-broken", "export", "{sae}", "{out}", "--cache", "{cache-root-garbage}", message="zarr.json is unreadable"
    ),
]
IMPORT_SAE = [
    case("src-missing", "import-sae", "{missing}", "{out}", message="does not exist"),
    case("src-empty-dir", "import-sae", "{empty-dir}", "{out}", message="has no cfg.json"),
    case("src-a-file", "import-sae", "{text-file}", "{out}", message="notes.txt"),
    case("src-an-mlsae-sae", "import-sae", "{sae}", "{out}", message="check --from"),
    case("src-a-cache-as-sparsify", "import-sae", "{cache}", "{out}", "--from", "sparsify", message="has no cfg.json"),
    case("src-a-file-as-reference", "import-sae", "{text-file}", "{out}", "--from", "reference", message="notes.txt"),
    case("from-unknown", "import-sae", "{sae}", "{out}", "--from", "onnx", message="--from"),
]
P = ("push", "{sae}", "me/sae", "--to-folder", "{out}")
PUSH = [
    *(case(f"sae-{k}", "push", v, "me/sae", "--to-folder", "{out}", message=m) for k, (v, m) in SAE_ARG.items()),
    case("eval-missing", *P, "--eval", "{missing}", message="does not exist"),
    case("eval-garbage", *P, "--eval", "{eval-garbage}", message="is not valid JSON"),
    case("eval-a-directory", *P, "--eval", "{empty-dir}", message="not a file"),
    case("cache-broken", *P, "--cache", "{cache-root-garbage}", message="zarr.json is unreadable"),
    case("repo-malformed", "push", "{sae}", "not a repo!", "--to-folder", "{out}", message="is not a hub id"),
    case(
        "to-folder-a-file",
        "push",
        "{sae}",
        "me/sae",
        "--to-folder",
        "{text-file}",
        message="is a file (choose",
    ),
]
S = ("sweep", "{cache}", "{out}", *FIT_OPTS)
SWEEP = [
    *(
        case(f"cache-{k}", "sweep", v, "{out}", *FIT_OPTS, message=m, code=code)
        for k, (v, m, code) in CACHE_ARG.items()
    ),
    case("k-not-numbers", *S, "--k", "a,b", message="--k"),
    case("k-empty-item", *S, "--k", "2,", message="--k"),
    case("lr-negative", *S, "--lr", "1e-3,-1", message="--lr"),
    case("k-0", *S, "--k", "0,2", message="--k"),
]

TABLES = {
    "fit": FIT, "eval": EVAL, "lens": LENS, "eval-lens": EVAL_LENS, "export": EXPORT, "import-sae": IMPORT_SAE,
    "push": PUSH, "sweep": SWEEP,
}  # fmt: skip
ALL = [(command, c) for command, cases in TABLES.items() for c in cases]


@pytest.mark.parametrize(("command", "c"), ALL, ids=[f"{command}:{c.id}" for command, c in ALL])
def test_bad_input(world: World, command: str, c: Case) -> None:
    check(main, c, {**world.paths, "stores": world.root / "stores"}, world.root)
