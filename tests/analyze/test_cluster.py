"""`--scheduler tcp://...`: variance and cosine on a dask.distributed cluster started by the test, whose worker
processes read the latents and the cache from their paths, equal the threaded results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.analyze.test_encode_cli import invoke, trained  # noqa: F401 - the module fixture

distributed = pytest.importorskip("distributed")


def test_variance_and_cosine_on_a_local_cluster_equal_threads(tmp_path: Path, trained: tuple[Path, Path]) -> None:  # noqa: F811
    cache, sae_dir = trained
    latents = tmp_path / "lat"
    assert invoke("encode", str(sae_dir), str(cache), str(latents), "--device", "cpu").exit_code == 0
    results: dict[str, dict[str, str]] = {}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        for name, scheduler in (("threads", "threads"), ("cluster", cluster.scheduler_address)):
            for command, source, file in (("variance", latents, "summary.json"), ("cosine", cache, "cosine.json")):
                out = tmp_path / f"{command}-{name}"
                result = invoke(command, str(source), str(out), "--scheduler", scheduler)
                assert result.exit_code == 0, result.stderr
                results.setdefault(name, {})[command] = (out / file).read_text()
    assert json.loads(results["cluster"]["variance"]) == json.loads(results["threads"]["variance"])
    assert json.loads(results["cluster"]["cosine"]) == json.loads(results["threads"]["cosine"])
