"""Sharded harvest scaling: one process against N shard workers on the same machine, same tokens.

Run: `.venv/bin/python benchmarks/harvest_shards.py [--tokens 32768] [--shards 2]`. Saves a random model of
Pythia-70m's shape (with the embedded model's tokenizer) to a temporary directory, then times the CLI end to
end (model loading included, as a user sees it): `mlsae-cache harvest` in one process with all cores, and N
`--num-shards N --shard-index i` workers started together with cores / N torch threads each. Prints tokens/s of
both, their ratio, and checks that the two stores hold the same bytes. On a machine with few cores the ratio
shows the mechanism, not a speed-up: the workers share the cores one process already used.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlsae_cache.models import load_model
from mlsae_cache.store import Cache


def save_model(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from harvest import pythia70m_shape  # the same random model as benchmarks/harvest.py

    loaded = pythia70m_shape(load_model("smollm2-135m", device="cpu"))
    path = root / "model"
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def command(out: Path, model: Path, tokens: int) -> list[str]:
    cli = [sys.executable, "-m", "mlsae_cache", "--quiet", "harvest", str(out), "--model", str(model)]
    return [*cli, "--max-tokens", str(tokens), "--device", "cpu"]


def run(cmds: list[list[str]], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in cmds]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"harvest failed: {err.decode()[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = save_model(root)
        one = run([command(root / "one", model, args.tokens)], cores)
        shard_cmds = [
            [*command(root / "sharded", model, args.tokens), "--num-shards", str(args.shards), "--shard-index", str(i)]
            for i in range(args.shards)
        ]
        many = run(shard_cmds, max(1, cores // args.shards))
        same = all(
            (root / "one" / f.relative_to(root / "sharded")).read_bytes() == f.read_bytes()
            for f in (root / "sharded").rglob("*")
            if f.is_file()
        )
        n = Cache(root / "one").n_tokens
    print(f"Pythia-70m shape, {n} tokens, {cores} cores, wall time including model loading")
    print(f"{'workers':>8} {'threads each':>13} {'seconds':>8} {'tokens/s':>9}")
    print(f"{1:>8} {cores:>13} {one:>8.1f} {n / one:>9.0f}")
    print(f"{args.shards:>8} {max(1, cores // args.shards):>13} {many:>8.1f} {n / many:>9.0f}")
    print(f"ratio {args.shards} shards / 1 process: {one / many:.2f}x; stores identical: {same}")


if __name__ == "__main__":
    main()
