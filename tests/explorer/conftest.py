"""Fixtures of the explorer's tests: planted stores (stores.py) and an index built from them with the tiny Llama
as the model of the logit effects and token text."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mlsae_analyze.explorer.build import IndexConfig, run_index
from tests.explorer.stores import Stores, make_stores


@pytest.fixture(scope="session")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Stores:
    return make_stores(tmp_path_factory.mktemp("explorer") / "stores")


@pytest.fixture(scope="session")
def llama(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


def index_config(stores: Stores, out: Path, **options: object) -> IndexConfig:
    return IndexConfig(stores.latents, out, stores.variance, stores.sae, **options)  # type: ignore[arg-type]


EVAL_FVU, EVAL_DELTA_CE = [0.1, 0.2, 0.3, None], [0.05, 0.1, 0.2, 0.4]


@pytest.fixture(scope="session")
def index(stores: Stores, llama: Path) -> Path:
    """The index of the planted stores, with the tiny Llama for logit effects and an eval result to show."""
    from mlsae_train.results import EvalResult

    n = len(EVAL_FVU)
    per_layer = {"mse": [1.0] * n, "l0": [4.0] * n, "n_rows": [100] * n}
    result = EvalResult(list(range(n)), EVAL_FVU, **per_layer, dead_fraction=0.0, fvu_mean=0.2, delta_ce=EVAL_DELTA_CE)
    result.write(stores.root / "eval.json")
    out = stores.root.parent / "index"
    run_index(index_config(stores, out, model=str(llama), eval=stores.root / "eval.json"))
    return out


class Server:
    """`mlsae-analyze explore` running in a subprocess on 127.0.0.1 and a free port (`--port 0`); its output is
    drained by a thread into `lines`."""

    def __init__(self, index: Path, *options: str, timeout_s: float = 120.0) -> None:
        cmd = [sys.executable, "-m", "mlsae_analyze", "explore", str(index), "--port", "0", *options]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        seen: queue.Queue[str | None] = queue.Queue()

        def drain() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.lines.append(line.rstrip("\n"))
                seen.put(line)
            seen.put(None)

        threading.Thread(target=drain, daemon=True).start()
        url = None
        while True:  # the URL, then the line on how to reach it (or what it listens on)
            try:
                line = seen.get(timeout=timeout_s)
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                raise RuntimeError("explore did not start:\n" + "\n".join(self.lines))
            if line.startswith("explorer: "):
                url = line.split()[1]
            if url is not None and ("from your laptop:" in line or "listening on" in line):
                break
        self.url = url.rstrip("/")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def server(index: Path):  # noqa: ANN201 - a Server
    running = Server(index)
    yield running
    running.stop()
