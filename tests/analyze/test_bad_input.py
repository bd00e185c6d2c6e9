"""Bad input to every `mlsae-analyze` command: one `Error: ...` line, exit 2 for input (1 for runtime), no
traceback, nothing created or changed (tests/badinput.py). `explore` fails before it listens."""

from __future__ import annotations

import pytest

from mlsae_analyze.cli import main
from tests.badinput import Case, World, case, check, make_world

LATENTS_ARG = {  # name: (path, exit code)
    "missing": ("{missing}", 2),
    "empty-dir": ("{empty-dir}", 2),
    "a-file": ("{text-file}", 2),
    "a-cache": ("{cache}", 2),
    "an-sae": ("{sae}", 2),
    "root-garbage": ("{latents-root-garbage}", 2),
    "root-truncated": ("{latents-root-truncated}", 2),
    "future-version": ("{latents-future-version}", 2),
    "no-record": ("{latents-no-record}", 2),
    "array-missing": ("{latents-array-missing}", 1),
    "array-meta-garbage": ("{latents-array-meta-garbage}", 1),
}
VARIANCE_ARG = {"missing": "{missing}", "empty-dir": "{empty-dir}", "a-cache": "{cache}", "latents": "{latents}"}


def latents_cases(command: str, *rest: str, first: bool = True) -> list[Case]:
    """`command LATENTS rest...` for each bad LATENTS (first argument), or `command rest... LATENTS`."""
    return [
        case(f"latents-{k}", command, *((v, *rest) if first else (*rest, v)), message="", code=code)
        for k, (v, code) in LATENTS_ARG.items()
    ]


ENCODE = [
    case("sae-missing", "encode", "{missing}", "{cache}", "{out}", message="does not exist"),
    case("sae-a-cache", "encode", "{cache}", "{sae}", "{out}", message="not an SAE checkpoint"),
    case("sae-weights-truncated", "encode", "{sae-weights-truncated}", "{cache}", "{out}", message="safetensors"),
    case("sae-d-model-wrong", "encode", "{sae-d-model-wrong}", "{cache}", "{out}", message="different checkpoints"),
    case("sae-future-version", "encode", "{sae-future-version}", "{cache}", "{out}", message="version 99"),
    case("cache-missing", "encode", "{sae}", "{missing}", "{out}", message="does not exist"),
    case("cache-root-garbage", "encode", "{sae}", "{cache-root-garbage}", "{out}", message="zarr.json"),
    case("cache-array-missing", "encode", "{sae}", "{cache-array-missing}", "{out}", message="activations", code=1),
    case("out-a-file", "encode", "{sae}", "{cache}", "{text-file}", message=""),
    case("out-a-cache", "encode", "{sae}", "{cache}", "{cache}", message=""),
    case("out-other-latents", "encode", "{sae}", "{cache}", "{latents-no-record}", message=""),
    case("device-unknown", "encode", "{sae}", "{cache}", "{out}", "--device", "tpu", message="--device"),
]
VARIANCE = [
    *latents_cases("variance", "{out}"),
    case("min-count-0", "variance", "{latents}", "{out}", "--min-count", "0", message="min_count"),
    case("scheduler-unknown", "variance", "{latents}", "{out}", "--scheduler", "nonesuch", message="--scheduler"),
    case("out-a-file", "variance", "{latents}", "{text-file}", message="is a file"),
    case("out-a-cache", "variance", "{latents}", "{cache}", message=""),
]
COSINE = [
    case("cache-missing", "cosine", "{missing}", "{out}", message="does not exist"),
    case("cache-a-latents-store", "cosine", "{latents}", "{out}", message="not an mlsae cache"),
    case("cache-root-garbage", "cosine", "{cache-root-garbage}", "{out}", message="zarr.json"),
    case("cache-array-missing", "cosine", "{cache-array-missing}", "{out}", message="activations", code=1),
    case("out-a-file", "cosine", "{cache}", "{text-file}", message="is a file"),
]
HEATMAP = [
    *(case(f"variance-{k}", "heatmap", v, "{out}", message="") for k, v in VARIANCE_ARG.items()),
    case(
        "variance-zarr-garbage",
        "heatmap",
        "{variance-root-garbage}",
        "{out}",
        message="variance.zarr/zarr.json is corrupted",
        code=1,
    ),
    case("out-a-file", "heatmap", "{variance}", "{text-file}", message=""),
]
PH = ("--text", "hello world")
PROMPT_HEATMAP = [
    case("sae-missing", "prompt-heatmap", "{missing}", "{cache}", "{out}", *PH, message="does not exist"),
    case("sae-a-cache", "prompt-heatmap", "{cache}", "{cache}", "{out}", *PH, message="not an SAE checkpoint"),
    case("cache-missing", "prompt-heatmap", "{sae}", "{missing}", "{out}", *PH, message="does not exist"),
    case("imported-cache-no-model", "prompt-heatmap", "{sae}", "{cache}", "{out}", *PH, message="--model"),
    case("text-empty", "prompt-heatmap", "{sae}", "{cache}", "{out}", "--text", "", message=""),
    case("model-missing", "prompt-heatmap", "{sae}", "{cache}", "{out}", *PH, "--model", "{missing}", message=""),
]
EXAMPLES = [
    *latents_cases("examples", "{out}"),
    case("latent-ids-garbage", "examples", "{latents}", "{out}", "--latents", "a,b", message="--latents"),
    case("latent-id-out-of-range", "examples", "{latents}", "{out}", "--latents", "999", message="999"),
    case("top-0", "examples", "{latents}", "{out}", "--top", "0", message="--top"),
    case("per-layer-0", "examples", "{latents}", "{out}", "--per-layer", "0", message="--per-layer"),
    case("context-negative", "examples", "{latents}", "{out}", "--context", "-1", message="--context"),
]
REPORT = [
    *(case(f"variance-{k}", "report", "{out}", "--variance", v, message="") for k, v in VARIANCE_ARG.items()),
    case("eval-garbage", "report", "{out}", "--variance", "{variance}", "--eval", "{eval-garbage}", message="JSON"),
    case("eval-missing", "report", "{out}", "--variance", "{variance}", "--eval", "{missing}", message=""),
    case("cosine-missing", "report", "{out}", "--variance", "{variance}", "--cosine", "{missing}", message=""),
    case("examples-a-cache", "report", "{out}", "--variance", "{variance}", "--examples", "{cache}", message=""),
    case("figures-missing", "report", "{out}", "--variance", "{variance}", "--figures", "{missing}", message=""),
]
IX = ("--variance", "{variance}", "--sae", "{sae}")
INDEX = [
    *latents_cases("index", "{out}", *IX),
    case("variance-missing", "index", "{latents}", "{out}", "--variance", "{missing}", "--sae", "{sae}", message=""),
    case("variance-a-cache", "index", "{latents}", "{out}", "--variance", "{cache}", "--sae", "{sae}", message=""),
    case("sae-missing", "index", "{latents}", "{out}", "--variance", "{variance}", "--sae", "{missing}", message=""),
    case("sae-weights-truncated", "index", "{latents}", "{out}", "--variance", "{variance}", "--sae",
         "{sae-weights-truncated}", message="safetensors"),
    case("sae-other", "index", "{latents}", "{out}", "--variance", "{variance}", "--sae", "{sae-d-model-wrong}",
         message=""),
    case("cache-broken", "index", "{latents}", "{out}", *IX, "--cache", "{cache-root-garbage}", message="zarr.json"),
    case("out-a-file", "index", "{latents}", "{text-file}", *IX, message=""),
]  # fmt: skip
EXPLORE = [
    case("index-missing", "explore", "{missing}", message="does not exist"),
    case("index-empty-dir", "explore", "{empty-dir}", message=""),
    case("index-a-cache", "explore", "{cache}", message=""),
    case("index-a-latents-store", "explore", "{latents}", message=""),
    case("index-root-garbage", "explore", "{cache-root-garbage}", message=""),
    case("port-out-of-range", "explore", "{latents}", "--port", "99999", message=""),
    case("max-prompt-tokens-1", "explore", "{latents}", "--max-prompt-tokens", "1", message="--max-prompt-tokens"),
]
EXPORT_DELPHI = [
    *latents_cases("export-delphi", "{out}"),
    case("n-splits-0", "export-delphi", "{latents}", "{out}", "--n-splits", "0", message="--n-splits"),
    case("cache-broken", "export-delphi", "{latents}", "{out}", "--cache", "{cache-root-garbage}", message=""),
]

TABLES = {
    "encode": ENCODE, "variance": VARIANCE, "cosine": COSINE, "heatmap": HEATMAP, "prompt-heatmap": PROMPT_HEATMAP,
    "examples": EXAMPLES, "report": REPORT, "index": INDEX, "explore": EXPLORE, "export-delphi": EXPORT_DELPHI,
}  # fmt: skip
ALL = [(command, c) for command, cases in TABLES.items() for c in cases]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    w = make_world(tmp_path_factory.mktemp("bad-analyze"))
    (w.root / "eval-garbage.json").write_text("{not json")
    w.paths["eval-garbage"] = w.root / "eval-garbage.json"
    broken = w.root / "broken" / "variance-root-garbage"
    import shutil

    shutil.copytree(w.stores.variance, broken)
    (broken / "variance.zarr" / "zarr.json").write_text("{not json")
    w.paths["variance-root-garbage"] = broken
    return w


@pytest.mark.parametrize(("command", "c"), ALL, ids=[f"{command}:{c.id}" for command, c in ALL])
def test_bad_input(world: World, command: str, c: Case) -> None:
    check(main, c, world.paths, world.root)
