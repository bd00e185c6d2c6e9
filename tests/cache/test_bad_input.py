"""Bad input to every `mlsae-cache` command: one `Error: ...` line, exit 2 for input (1 for runtime), no traceback,
nothing created or changed (tests/badinput.py). Cases beside tests/cache/test_cli.py's harvest table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlsae_cache.cli import main
from tests.badinput import Case, World, case, check, flip_byte, make_world, npy_files


def _text_files(root: Path) -> dict[str, Path]:
    root.mkdir()
    files = {
        "broken.jsonl": '{"text": "hello world"}\n{"text": "broken\n',
        "broken.json": "[1, 2",
        "wrong-shape.json": '{"text": 3}',
        "not.parquet": "not a parquet file\n",
        "empty.jsonl": "",
        "empty.txt": "",
        "table.csv": "text\nhello\n",
    }
    paths = {}
    for name, text in files.items():
        (root / name).write_text(text)
        paths[name] = root / name
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    paths["binary.txt"] = root / "binary.txt"
    (root / "dir.jsonl").mkdir()
    shutil.copy(paths["broken.jsonl"], root / "dir.jsonl" / "a.jsonl")
    paths["dir.jsonl"] = root / "dir.jsonl"
    return paths


def _broken_models(llama: Path, root: Path) -> dict[str, Path]:
    def copy(name: str) -> Path:
        return Path(shutil.copytree(llama, root / name))

    models = {name: copy(name) for name in ("truncated", "flipped", "config", "arch", "tokenizer", "weights")}
    data = (models["truncated"] / "model.safetensors").read_bytes()
    (models["truncated"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    flip_byte(models["flipped"] / "model.safetensors", 0.0001)
    (models["config"] / "config.json").write_text('{"model_type": "llama", ')
    config = json.loads((models["arch"] / "config.json").read_text())
    (models["arch"] / "config.json").write_text(json.dumps({**config, "model_type": "nonesuch"}))
    for p in models["tokenizer"].glob("tokenizer*"):
        p.unlink()
    (models["weights"] / "model.safetensors").unlink()
    return models


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> World:
    w = make_world(tmp_path_factory.mktemp("bad-cache"))
    w.paths.update({f"text:{k}": v for k, v in _text_files(w.root / "text").items()})
    w.paths.update({f"model:{k}": v for k, v in _broken_models(tiny_models["llama"], w.root / "models").items()})
    w.paths.update({f"npy:{k}": v for k, v in npy_files(w.root / "npy").items()})
    w.paths["llama"] = tiny_models["llama"]
    (w.root / "presets").mkdir()
    for name, text in {"garbage": "[harvest\n", "unknown": "[harvest]\nnonesuch = 1\n", "type": '[harvest]\n'
                       'context_length = "long"\n'}.items():  # fmt: skip
        (w.root / "presets" / f"{name}.toml").write_text(text)
        w.paths[f"preset:{name}"] = w.root / "presets" / f"{name}.toml"
    return w


H = ("harvest", "{out}", "--model", "{llama}", "--context-length", "16", "--max-tokens", "200", "--device", "cpu")
HARVEST = [
    case("text-broken-jsonl", *H, "--dataset", "{text:broken.jsonl}", message="cannot be read as JSON"),
    case("text-broken-jsonl-streaming", *H, "--streaming", "--dataset", "{text:broken.jsonl}", message="as JSON"),
    case("text-broken-json", *H, "--dataset", "{text:broken.json}", message="cannot be read as JSON"),
    case("text-column-not-text", *H, "--dataset", "{text:wrong-shape.json}", message="wrong-shape.json"),
    case("text-not-parquet", *H, "--dataset", "{text:not.parquet}", message="cannot be read as Parquet"),
    case("text-binary-txt", *H, "--dataset", "{text:binary.txt}", message="cannot be read as text"),
    case("text-binary-txt-streaming", *H, "--streaming", "--dataset", "{text:binary.txt}", message="as text"),
    case("text-empty-jsonl", *H, "--dataset", "{text:empty.jsonl}", message="is empty"),
    case("text-empty-txt", *H, "--dataset", "{text:empty.txt}", message="is empty"),
    case("text-directory", *H, "--dataset", "{text:dir.jsonl}", message="is a directory"),
    case("text-unsupported-suffix", *H, "--dataset", "{text:table.csv}", message="unsupported suffix '.csv'"),
    case("model-weights-truncated", *H, "--model", "{model:truncated}", message="could not load model"),
    case("model-weights-header-flipped", *H, "--model", "{model:flipped}", message="could not load model"),
    case("model-config-garbage", *H, "--model", "{model:config}", message="could not load model"),
    case("model-unknown-architecture", *H, "--model", "{model:arch}", message="nonesuch"),
    case("model-no-tokenizer", *H, "--model", "{model:tokenizer}", message="could not load model"),
    case("model-no-weights", *H, "--model", "{model:weights}", message="could not load model"),
    case("model-empty-dir", *H, "--model", "{empty-dir}", message="could not load model"),
    case("model-a-file", *H, "--model", "{text-file}", message="does not exist"),
    case("model-a-cache", *H, "--model", "{cache}", message="could not load model"),
    case("batch-size-0", *H, "--batch-size", "0", message="--batch-windows must be at least 1"),
    case("max-tokens-negative", *H, "--max-tokens", "-5", message="--max-tokens"),
    case("max-tokens-not-a-count", *H, "--max-tokens", "lots", message="is not a count"),
    case("chunk-tokens-0", *H, "--chunk-tokens", "0", message="--chunk-tokens"),
    case("shard-index-too-large", *H, "--num-shards", "2", "--shard-index", "2", message="--shard-index"),
    case("num-shards-0", *H, "--num-shards", "0", message="--num-shards"),
    case("device-unknown", *H, "--device", "tpu", message="--device"),
    case("dtype-unknown", *H, "--dtype", "int8", message="--dtype"),
    case("layers-garbage", *H, "--layers", "a-b", message="--layers"),
    case("out-a-latents-store", *H[:1], "{latents}", *H[2:], message="not a cache to write"),
    case("out-a-broken-cache", *H[:1], "{cache-root-garbage}", *H[2:], message="not a cache to write"),
    case("config-missing", *H, "--config", "{missing}", message="--config"),
    case("config-not-toml", *H, "--config", "{preset:garbage}", message="--config"),
    case("config-unknown-option", *H, "--config", "{preset:unknown}", message="nonesuch"),
    case("config-wrong-type", *H, "--config", "{preset:type}", message="context_length"),
]

IMP = ("import", "{out}", "--activations")
IMPORT = [
    case("activations-missing", *IMP, "{missing}", message="does not exist"),
    case("activations-a-directory", *IMP, "{empty-dir}", message="--activations"),
    case("activations-empty-file", *IMP, "{empty-file}", message="not a .npy array"),
    case("activations-text", *IMP, "{npy:acts-text}", message="not a .npy array"),
    case("activations-truncated", *IMP, "{npy:acts-truncated}", message="acts-truncated.npy"),
    case("activations-object-dtype", *IMP, "{npy:acts-object}", message="acts-object.npy"),
    case("activations-2d", *IMP, "{npy:acts-2d}", message="expected (token, layer, d_model)"),
    case("activations-4d", *IMP, "{npy:acts-4d}", message="expected (token, layer, d_model)"),
    case("activations-no-tokens", *IMP, "{npy:acts-no-tokens}", message="expected (token, layer, d_model)"),
    case("activations-complex", *IMP, "{npy:acts-complex}", message="complex"),
    case("activations-nan", *IMP, "{npy:acts-nan}", message="NaN or infinite"),
    case("activations-overflow-float16", *IMP, "{npy:acts-huge}", "--dtype", "float16", message="--dtype float32"),
    case("token-ids-missing", *IMP, "{npy:acts}", "--token-ids", "{missing}", message="does not exist"),
    case("token-ids-short", *IMP, "{npy:acts}", "--token-ids", "{npy:ids-short}", message="--token-ids has shape"),
    case("token-ids-float", *IMP, "{npy:acts}", "--token-ids", "{npy:ids-float}", message="--token-ids"),
    case("token-ids-negative", *IMP, "{npy:acts}", "--token-ids", "{npy:ids-negative}", message="--token-ids"),
    case("context-length-0", *IMP, "{npy:acts}", "--context-length", "0", message="--context-length"),
    case("chunk-tokens-0", *IMP, "{npy:acts}", "--chunk-tokens", "0", message="--chunk-tokens"),
    case("out-a-file", "import", "{text-file}", "--activations", "{npy:acts}", message="is a file"),
    case("out-a-foreign-dir", "import", "{stores}", "--activations", "{npy:acts}", message="not a cache to write"),
    case("out-an-sae", "import", "{sae}", "--activations", "{npy:acts}", message="SAE"),
    case("out-an-existing-cache", "import", "{cache}", "--activations", "{npy:acts}", message="--overwrite"),
]

STORE_PATHS = {
    "missing": ("{missing}", "does not exist"),
    "empty-dir": ("{empty-dir}", "an empty directory, not an mlsae cache"),
    "a-file": ("{text-file}", "a file, not an mlsae cache"),
    "an-sae": ("{sae}", "SAE checkpoint, not an mlsae cache"),
    "a-latents-store": ("{latents}", "latents store, not an mlsae cache"),
    "root-garbage": ("{cache-root-garbage}", "zarr.json"),
    "root-truncated": ("{cache-root-truncated}", "zarr.json"),
    "root-empty": ("{cache-root-empty}", "zarr.json"),
    "future-version": ("{cache-future-version}", "version 99"),
    "no-record": ("{cache-no-record}", "no 'mlsae' attribute"),
    "array-missing": ("{cache-array-missing}", "activations/zarr.json is missing or unreadable"),
    "array-meta-garbage": ("{cache-array-meta-garbage}", "activations/zarr.json is missing or unreadable"),
}
DAMAGED = {"array-missing", "array-meta-garbage"}
"""Damage below a readable root (exit 1, as a corrupted chunk)."""
INFO = [
    case(name, "info", path, message=msg, code=1 if name in DAMAGED else 2) for name, (path, msg) in STORE_PATHS.items()
]
UNREADABLE_ROOT = {"root-garbage", "root-truncated", "root-empty"}
"""`verify` takes a store whose root zarr.json cannot be read as damaged (exit 1): the store to check is given."""
VERIFY = [
    *(
        case(name, "verify", path, message=msg, code=1 if name in DAMAGED | UNREADABLE_ROOT else 2)
        for name, (path, msg) in STORE_PATHS.items()
        if name not in ("a-latents-store", "an-sae")  # stores `verify` checks too (tests/test_corruption.py)
    ),
    case("chunk-flipped", "verify", "{cache-chunk-flipped}", message="corrupted", code=1),
    case("chunk-truncated", "verify", "{cache-chunk-truncated}", message="corrupted", code=1),
]

TABLES = {"harvest": HARVEST, "import": IMPORT, "info": INFO, "verify": VERIFY}
ALL = [(command, c) for command, cases in TABLES.items() for c in cases]


@pytest.mark.parametrize(("command", "c"), ALL, ids=[f"{command}:{c.id}" for command, c in ALL])
def test_bad_input(world: World, command: str, c: Case) -> None:
    paths = {**world.paths, "stores": world.root / "stores"}
    check(main, c, paths, world.root)
