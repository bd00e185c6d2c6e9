"""Latency of the explorer's live routes on a real model (run by `benchmarks/explorer.py --live INDEX`).

The server's app is built in-process over an index (the demo's: `make demo` writes demo_out/explorer) with its
cache's model, and requests go through FastAPI's TestClient (everything but the socket). Each repeat uses a new
prompt of exactly `tokens` tokens (cut from CPython's pydoc text), so the prompt route always runs the model:
- prompt: POST /api/v1/prompt (one forward pass, every stored layer encoded, quantiles from the index);
- logits: POST /api/v1/prompt/logits at a random stored layer and position (the prompt's run is then cached:
  the blocks after the layer re-run, then the final norm and the LM head);
- generate: POST /api/v1/prompt/generate, 16 tokens with one steering edit (two continuations: default and
  steered).
Medians and 95th percentiles over the repeats, in milliseconds, beside the issue's targets.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

TARGETS_MS = {"prompt": 2000.0, "logits": 1000.0}


def prompts(tokenizer: object, n: int, tokens: int) -> list[str]:
    """n texts of `tokens` tokens each (the separator included), from consecutive parts of the pydoc corpus."""
    from pydoc_data.topics import topics

    ids = tokenizer(" ".join(topics[k] for k in sorted(topics)), add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    out, step = [], tokens - 1
    for i in range(n):
        piece = ids[i * step * 3 : i * step * 3 + step]
        text = tokenizer.decode(piece)  # type: ignore[attr-defined]
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) > step:  # type: ignore[operator]
            text = text[:-1]
        out.append(text)
    return out


def _stats(ms: list[float]) -> tuple[float, float]:
    return statistics.median(ms), float(np.percentile(ms, 95))


def measure_live(index: Path, repeats: int, tokens: int, device: str = "cpu") -> dict[str, list[float]]:
    from fastapi.testclient import TestClient

    from mlsae_analyze.explorer.serve import ExploreConfig, create_app

    t0 = time.perf_counter()
    app = create_app(ExploreConfig(index=index, model="cache", device=device, max_prompt_tokens=max(tokens, 256)))
    print(f"live model loaded in {time.perf_counter() - t0:.1f} s")
    live = app.state.live.live
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {"prompt": [], "logits": [], "generate": []}
    with TestClient(app) as client:
        texts = prompts(live.loaded.tokenizer, repeats + 1, tokens)
        client.post("/api/v1/prompt", json={"text": texts[-1]})  # warm-up: first calls allocate
        for text in texts[:repeats]:
            layer = int(rng.choice(live.layers))
            bodies = {
                "prompt": ("", {"text": text}),
                "logits": ("/logits", {"text": text, "layer": layer, "position": int(rng.integers(1, tokens))}),
                "generate": (
                    "/generate",
                    {"text": text, "n_tokens": 16, "seed": 0, "edits": [{"latent": 1, "layer": layer, "factor": 4}]},
                ),
            }
            for name, (route, body) in bodies.items():
                start = time.perf_counter()
                response = client.post(f"/api/v1/prompt{route}", json=body)
                times[name].append((time.perf_counter() - start) * 1000)
                assert response.status_code == 200, response.text
        n_tokens = len(client.post("/api/v1/prompt", json={"text": texts[0]}).json()["tokens"])
    print(f"prompts of {n_tokens} tokens, {len(live.layers)} layers encoded, {repeats} repeats")
    return times


def report_live(index: Path, repeats: int, tokens: int) -> None:
    times = measure_live(index, repeats, tokens)
    print(f"{'route':<34}{'median ms':>10}{'p95 ms':>10}{'target ms':>11}")
    names = {
        "prompt": f"prompt ({tokens} tokens, all layers)",
        "logits": "reconstruction logits",
        "generate": "steered continuation (16 tokens)",
    }
    for name, label in names.items():
        median, p95 = _stats(times[name])
        target = TARGETS_MS.get(name)
        print(f"{label:<34}{median:>10.0f}{p95:>10.0f}{'' if target is None else f'{target:>11.0f}'}")
