"""mlsae_analyze.variance against a dense brute force written straight from docs/METHOD.md section 6."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import xarray as xr
from dask.callbacks import Callback

from mlsae_analyze import variance
from mlsae_analyze.results import VarianceOutput
from mlsae_analyze.variance import VarianceParams, build_variance_graph, compute_variance
from mlsae_cache.core.errors import InputError, StoreError

N_LAYERS, K, N_LATENTS = 4, 3, 20
WINDOW_LENGTHS = (10, 71, 33, 58, 1, 90, 37)  # 300 tokens
SEQUENCE_IDS = (5, 6, 7, 9, 10, 11, 12)
SPLITTING_CHUNKS = (37, 100, 13, 150)  # cuts windows 2, 3 and 6
STORE_CHUNK = 45  # cuts windows 2, 4 and 6
SUMMARY_KEYS = {
    "var_total",
    "var_within_latent",
    "var_within_token",
    "rel_var_latent",
    "rel_var_token",
    "mean_layer_std",
    "frac_multi_layer",
    "n_rows",
    "reference",
}
REFERENCE_KEYS = {"exp_var_tf", "exp_var_f", "var_l", "rel_var_f", "rel_var_t", "n_windows"}


def make_latents(seed: int = 0) -> xr.Dataset:
    """Random latents: latents repeat across the layers of a token, some slots are 0, latent 19 never fires."""
    rng = np.random.default_rng(seed)
    n_tokens = sum(WINDOW_LENGTHS)
    pools = rng.integers(0, N_LATENTS - 1, (n_tokens, 5))
    indices = np.empty((n_tokens, N_LAYERS, K), np.int32)
    for t in range(n_tokens):
        for layer in range(N_LAYERS):
            indices[t, layer] = rng.choice(np.unique(pools[t]), K, replace=False)
    values = rng.exponential(1.0, indices.shape).astype(np.float32)
    inactive = rng.random(indices.shape) < 0.25
    values[inactive] = 0
    # An inactive slot may carry any index: a duplicate of an active one, or junk.
    junk = np.where(rng.random(indices.shape) < 0.5, -1, indices[..., :1])
    indices = np.where(inactive, junk, indices).astype(np.int32)
    sequence = np.repeat(SEQUENCE_IDS, WINDOW_LENGTHS).astype(np.int64)
    trainable = rng.random(n_tokens) > 0.15
    trainable[np.cumsum((0, *WINDOW_LENGTHS[:-1]))] = False  # position 0 of every window
    return xr.Dataset(
        {
            "indices": (("token", "layer", "k"), indices),
            "values": (("token", "layer", "k"), values),
            "trainable": (("token",), trainable),
            "sequence": (("token",), sequence),
        },
        coords={"layer": np.array([2, 5, 8, 11], np.int32)},
    )


def dense_activations(ds: xr.Dataset, include_untrainable: bool) -> tuple[np.ndarray, np.ndarray]:
    """a[l, t, j] over the kept tokens, shape [L, T, n], and their window ids [T]."""
    keep = np.ones(ds.sizes["token"], bool) if include_untrainable else ds["trainable"].values
    indices, values = ds["indices"].values[keep], ds["values"].values[keep]
    dense = np.zeros((N_LAYERS, keep.sum(), N_LATENTS))
    t, layer, _ = np.nonzero(values > 0)
    np.add.at(dense, (layer, t, indices[values > 0]), values[values > 0])
    return dense, ds["sequence"].values[keep]


def brute_force(a: np.ndarray, min_count: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Default mode, with both laws of total variance checked on the way."""
    ell = np.arange(N_LAYERS, dtype=float)
    counts, totals = (a > 0).sum(1), a.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = totals / totals.sum(0)
        s = a.sum(0)  # [T, n]
        mean_tj = np.einsum("l,ltj->tj", ell, a) / s
        var_tj = np.einsum("l,ltj->tj", ell**2, a) / s - mean_tj**2
    mean = ell @ probs
    var = (ell**2) @ probs - mean**2
    p = a / a.sum()
    mean_all = np.einsum("l,ltj->", ell, p)
    var_total = np.einsum("l,ltj->", ell**2, p) - mean_all**2
    active = totals.sum(0) > 0
    p_j = totals.sum(0)[active] / a.sum()
    var_within_latent = p_j @ var[active]
    np.testing.assert_allclose(var_total, var_within_latent + p_j @ (mean[active] - mean_all) ** 2)
    fired = s > 0
    var_within_token = (s[fired] * var_tj[fired]).sum() / a.sum()
    for j in np.flatnonzero(active):
        w = s[fired[:, j], j] / s[:, j].sum()
        m, v = mean_tj[fired[:, j], j], var_tj[fired[:, j], j]
        np.testing.assert_allclose(var[j], w @ v + w @ (m - w @ m) ** 2)
    n_active = (counts >= min_count).sum(0)
    arrays = {"counts": counts, "totals": totals, "probs": probs, "layer_mean": mean, "layer_var": var}
    arrays |= {"layer_std": np.sqrt(var), "n_layers_active": n_active}
    summary = {
        "var_total": var_total,
        "var_within_latent": var_within_latent,
        "var_within_token": var_within_token,
        "rel_var_latent": var_within_latent / var_total,
        "rel_var_token": var_within_token / var_within_latent,
        "mean_layer_std": np.sqrt(var[active]).mean(),
        "frac_multi_layer": (n_active[active] > 1).mean(),
        "n_rows": a.shape[1] * N_LAYERS,
    }
    return arrays, summary


def brute_reference(a: np.ndarray, sequence: np.ndarray) -> dict[str, float]:
    """The reference's Metric.update per window (dense, unnormalised), then plain means over windows."""

    def v(x: np.ndarray) -> np.ndarray:
        ell = np.arange(N_LAYERS, dtype=float).reshape(-1, *([1] * (x.ndim - 1)))
        return (ell**2 * x).sum(0) - ((ell * x).sum(0)) ** 2

    rows: list[list[float]] = []
    for seq in np.unique(sequence):
        window = a[:, sequence == seq, :]
        with np.errstate(invalid="ignore"):
            q = np.nan_to_num(window / window.sum(0))
        tf, f, var_l = v(q).mean(), v(q.mean(1)).mean(), float(v(q.mean((1, 2))))
        rows.append([tf, f, var_l, f / var_l, tf / f])
    names = ("exp_var_tf", "exp_var_f", "var_l", "rel_var_f", "rel_var_t")
    means = dict(zip(names, np.mean(rows, 0), strict=True))
    return means | {"n_windows": len(rows)}


def unpack(result: VarianceOutput) -> tuple[xr.Dataset, dict]:
    """The Dataset and the summary's computed numbers (no format, version or provenance)."""
    summary = {k: v for k, v in result.summary.to_dict().items() if k in SUMMARY_KEYS}
    return result.dataset, summary


def brute_window(a: np.ndarray, sequence: np.ndarray, offset: float = 0.0) -> dict[str, float]:
    """The window mode, dense: per window, normalised mixtures of the pairs and latents that fire, then plain
    means over the windows where something fires."""
    ell = np.arange(N_LAYERS, dtype=float) + offset

    def var(p: np.ndarray) -> float:  # p: a distribution over layers
        return float((ell**2) @ p - (ell @ p) ** 2)

    rows: list[list[float]] = []
    for seq in np.unique(sequence):
        window = a[:, sequence == seq, :]
        s = window.sum(0)  # [T, n]
        fired = s > 0
        if not fired.any():
            continue
        q = window[:, fired] / s[fired]  # [L, P] normalised mixtures
        tf = float(np.mean([var(q[:, i]) for i in range(q.shape[1])]))
        per_latent = []
        for j in np.flatnonzero(fired.any(0)):
            t = fired[:, j]
            per_latent.append(var((window[:, t, j] / s[t, j]).mean(1)))
        f, var_l = float(np.mean(per_latent)), var(q.mean(1))
        rows.append([tf, f, var_l, f / var_l, tf / f])
    names = ("exp_var_tf", "exp_var_f", "var_l", "rel_var_f", "rel_var_t")
    return dict(zip(names, np.mean(rows, 0), strict=True)) | {"n_windows": len(rows)}


def brute_multi_layer(a: np.ndarray) -> dict[str, dict[str, float]]:
    totals, counts = a.sum(1), (a > 0).sum(1)
    active = totals.sum(0) > 0
    share = totals[:, active] / totals[:, active].sum(0)
    by_share = {f"{s:g}": float(((share >= s).sum(0) >= 2).mean()) for s in (0.01, 0.05, 0.1, 0.25)}
    by_rows = {str(r): float(((counts[:, active] >= r).sum(0) >= 2).mean()) for r in (1, 10, 100, 1000)}
    return {"by_share": by_share, "by_rows": by_rows}


def assert_results_close(got: VarianceOutput, want: tuple[dict, dict], rtol: float = 1e-10) -> None:
    ds, summary = unpack(got)
    arrays, want_summary = want
    assert set(ds.data_vars) == set(arrays) and ds.attrs["format"] == "mlsae-variance"
    for name, expected in arrays.items():
        np.testing.assert_allclose(ds[name].values, expected, rtol=rtol, atol=1e-12, err_msg=name)
    assert set(summary) == SUMMARY_KEYS and set(summary["reference"]) == REFERENCE_KEYS
    for name, expected in want_summary.items():
        if name == "multi_layer":
            assert got.summary.multi_layer == expected
            continue
        block, _, key = name.partition(".")
        got_value = {"ref": got.summary.reference, "win": got.summary.window}[block][key] if key else summary[name]
        np.testing.assert_allclose(got_value, expected, rtol=rtol, atol=1e-12, err_msg=name)


def expected(ds: xr.Dataset, include_untrainable: bool = False, min_count: int = 1) -> tuple[dict, dict]:
    a, sequence = dense_activations(ds, include_untrainable)
    arrays, summary = brute_force(a, min_count)
    summary |= {f"ref.{k}": v for k, v in brute_reference(a, sequence).items()}
    summary |= {f"win.{k}": v for k, v in brute_window(a, sequence).items()}
    summary["multi_layer"] = brute_multi_layer(a)
    return arrays, summary


@pytest.fixture(scope="module")
def latents() -> xr.Dataset:
    return make_latents()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, latents: xr.Dataset) -> str:
    path = str(tmp_path_factory.mktemp("latents") / "latents.zarr")
    encoding = {  # chunks that split windows, disagree between variables, and split layers
        "indices": {"chunks": (STORE_CHUNK, N_LAYERS, K)},
        "values": {"chunks": (STORE_CHUNK, 2, K)},
        "trainable": {"chunks": (100,)},
        "sequence": {"chunks": (STORE_CHUNK,)},
    }
    latents.to_zarr(path, consolidated=False, encoding=encoding)
    return path


@pytest.mark.parametrize("include_untrainable", [False, True], ids=["trainable", "all"])
@pytest.mark.parametrize("min_count", [1, 3])
def test_matches_brute_force(latents: xr.Dataset, include_untrainable: bool, min_count: int) -> None:
    got = compute_variance(
        latents.chunk({"token": 64}),
        VarianceParams(N_LATENTS, min_count=min_count, include_untrainable=include_untrainable),
    )
    assert_results_close(got, expected(latents, include_untrainable, min_count))
    ds, summary = unpack(got)
    assert ds["counts"].dims == ("layer", "latent") and ds["layer_mean"].dims == ("latent",)
    assert ds["counts"].dtype == np.int64 and ds["totals"].dtype == np.float64
    assert list(ds["layer"].values) == [2, 5, 8, 11]  # copied; statistics use positions 0..3
    assert np.isnan(ds["probs"].values[:, N_LATENTS - 1]).all()
    n_windows = len(SEQUENCE_IDS) - (0 if include_untrainable else 1)  # the 1-token window is untrainable
    assert summary["reference"]["n_windows"] == n_windows
    assert 0 < summary["rel_var_token"] < 1 and 0 < summary["rel_var_latent"] < 1


def test_include_untrainable_changes_results(latents: xr.Dataset) -> None:
    _, kept = unpack(compute_variance(latents, VarianceParams(N_LATENTS)))
    _, everything = unpack(compute_variance(latents, VarianceParams(N_LATENTS, include_untrainable=True)))
    assert kept["n_rows"] == latents["trainable"].values.sum() * N_LAYERS
    assert everything["n_rows"] == latents.sizes["token"] * N_LAYERS
    assert kept["var_within_token"] != everything["var_within_token"]
    assert kept["reference"]["exp_var_tf"] != everything["reference"]["exp_var_tf"]


@pytest.mark.parametrize(
    ("chunks", "scratch_entries"),
    [(300, 2**18), (SPLITTING_CHUNKS, 2**18), (SPLITTING_CHUNKS, 7 * N_LATENTS), (1, 2**18)],
    ids=["one-chunk", "split-windows", "split-windows-small-batches", "token-per-chunk"],
)
def test_chunking_does_not_change_results(latents: xr.Dataset, chunks: object, scratch_entries: int) -> None:
    ds = latents.chunk({"token": chunks})
    got = compute_variance(ds, VarianceParams(N_LATENTS, scratch_entries=scratch_entries), scheduler="sync")
    assert_results_close(got, expected(latents), rtol=1e-12)


def test_window_splitting_chunkings_agree_with_each_other(latents: xr.Dataset) -> None:
    params = VarianceParams(N_LATENTS)
    one_ds, one = unpack(compute_variance(latents.chunk({"token": 300}), params, scheduler="sync"))
    split_ds, split = unpack(compute_variance(latents.chunk({"token": SPLITTING_CHUNKS}), params, scheduler="sync"))
    xr.testing.assert_equal(one_ds[["counts", "n_layers_active"]], split_ds[["counts", "n_layers_active"]])
    xr.testing.assert_allclose(one_ds, split_ds, rtol=1e-13, atol=0)
    assert one["n_rows"] == split["n_rows"] and one["reference"]["n_windows"] == split["reference"]["n_windows"]
    for key in sorted(SUMMARY_KEYS - {"reference", "n_rows"}):
        assert one[key] == pytest.approx(split[key], rel=1e-13), key
    for key in sorted(REFERENCE_KEYS - {"n_windows"}):
        assert one["reference"][key] == pytest.approx(split["reference"][key], rel=1e-13), key


def test_graph_building_computes_nothing(store: str, latents: xr.Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    tasks: list[str] = []
    chunk_calls: list[int] = []
    chunk_partial = variance._chunk_partial
    monkeypatch.setattr(variance, "_chunk_partial", lambda *a: chunk_calls.append(1) or chunk_partial(*a))

    def counting_get(graph: object, keys: object, **kwargs: object) -> object:
        calls.append(1)
        return dask.get(graph, keys, **kwargs)

    with dask.config.set(scheduler=counting_get), Callback(pretask=lambda key, *_: tasks.append(key)):
        ds = xr.open_zarr(store, consolidated=False)
        graph = build_variance_graph(ds, VarianceParams(N_LATENTS))
        assert calls == [] and tasks == [] and chunk_calls == []
        got = dask.compute(graph)[0]
    assert len(calls) == 1 and len(chunk_calls) == 7 and len(tasks) > 7
    assert_results_close(got, expected(latents))


def assert_identical(x: VarianceOutput, y: VarianceOutput) -> None:
    a, b = unpack(x), unpack(y)
    xr.testing.assert_identical(a[0], b[0])
    assert a[1]["reference"] == b[1]["reference"]
    np.testing.assert_array_equal(
        [v for k, v in sorted(a[1].items()) if k != "reference"],
        [v for k, v in sorted(b[1].items()) if k != "reference"],
    )


def test_schedulers_agree(store: str, latents: xr.Dataset) -> None:
    distributed = pytest.importorskip("distributed")
    ds = xr.open_zarr(store, consolidated=False)
    assert ds["indices"].chunks[0] == (45,) * 6 + (30,)
    baseline = compute_variance(ds, VarianceParams(N_LATENTS), scheduler="sync")
    assert_results_close(baseline, expected(latents))
    for scheduler in ("threads", "processes"):
        assert_identical(compute_variance(ds, VarianceParams(N_LATENTS), scheduler=scheduler), baseline)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        assert_identical(compute_variance(ds, VarianceParams(N_LATENTS), scheduler=cluster.scheduler_address), baseline)


def test_sliced_store_matches_brute_force(store: str, latents: xr.Dataset) -> None:
    """As the CLI opens a store: only the committed rows, which breaks dask's read fusion."""
    ds = xr.open_zarr(store, consolidated=False).isel(token=slice(0, 250))
    got = compute_variance(ds, VarianceParams(N_LATENTS), scheduler="sync")
    assert_results_close(got, expected(latents.isel(token=slice(0, 250))))


def test_no_trainable_rows_is_an_input_error(latents: xr.Dataset) -> None:
    ds = latents.assign(trainable=latents["trainable"] & False)
    with pytest.raises(InputError, match=r"no rows to analyse: 0 of 300 tokens .*include_untrainable=True"):
        compute_variance(ds, VarianceParams(N_LATENTS))
    with pytest.raises(InputError, match="no rows to analyse: the latents Dataset holds 0 tokens"):
        compute_variance(latents.isel(token=slice(0, 0)), VarianceParams(N_LATENTS))


def test_all_inactive_is_an_input_error(latents: xr.Dataset) -> None:
    ds = latents.assign(values=latents["values"] * 0)
    with pytest.raises(InputError, match="no active latents: every value is 0"):
        compute_variance(ds.chunk({"token": 50}), VarianceParams(N_LATENTS))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda ds: ds.drop_vars("sequence"), StoreError, "no variable 'sequence'"),
        (lambda ds: ds.assign(values=ds["values"] - 5), StoreError, "must be finite and >= 0"),
        (
            lambda ds: ds.assign(indices=ds["indices"] + N_LATENTS),
            StoreError,
            r"latent [0-9]+ at an active slot, outside \[0, 20\)",
        ),
    ],
    ids=["missing-variable", "negative-values", "index-out-of-range"],
)
def test_bad_store_is_a_store_error(latents: xr.Dataset, change: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        compute_variance(change(latents), VarianceParams(N_LATENTS))


@pytest.mark.parametrize("option", [{"min_count": 0}, {"n_latents": 0}, {"scratch_entries": -1}])
def test_bad_option_is_an_input_error(latents: xr.Dataset, option: dict) -> None:
    kwargs = {"n_latents": N_LATENTS} | option
    with pytest.raises(InputError, match="must be a positive integer"):
        build_variance_graph(latents, VarianceParams(**kwargs))


@pytest.mark.parametrize("offset", [5.0, 30.0, -3.0])
def test_relabelling_the_layers_changes_only_the_reference_mode(latents: xr.Dataset, offset: float) -> None:
    """l -> l + c leaves every pooled and window statistic as it is; the reference mode's, which apply V to
    mixtures that are not normalised, move."""
    base = compute_variance(latents, VarianceParams(N_LATENTS), scheduler="sync").summary
    moved = compute_variance(latents, VarianceParams(N_LATENTS, layer_offset=offset), scheduler="sync").summary
    for key in ("var_total", "var_within_latent", "var_within_token", "rel_var_latent", "rel_var_token"):
        assert getattr(moved, key) == pytest.approx(getattr(base, key), rel=1e-9), key
    for key in ("exp_var_tf", "exp_var_f", "var_l", "rel_var_f", "rel_var_t"):
        assert moved.window[key] == pytest.approx(base.window[key], rel=1e-9), key
    a, sequence = dense_activations(latents, False)
    np.testing.assert_allclose(moved.window["rel_var_t"], brute_window(a, sequence, offset)["rel_var_t"])
    assert moved.reference["rel_var_t"] != pytest.approx(base.reference["rel_var_t"], rel=1e-3)


def planted(one_layer_per_token: bool) -> xr.Dataset:
    """Every latent fires on every token of 8 windows of 20: at one layer per token (a different layer for
    different tokens), or spread identically over all four layers at every token."""
    n_tokens, k = 160, 2
    indices = np.zeros((n_tokens, N_LAYERS, k), np.int32)
    values = np.zeros((n_tokens, N_LAYERS, k), np.float32)
    for t in range(n_tokens):
        for j in range(k):
            if one_layer_per_token:
                values[t, (t + j) % N_LAYERS, j] = 1.0 + j
            else:
                values[t, :, j] = 1.0 + j
            indices[t, :, j] = j
    return xr.Dataset(
        {
            "indices": (("token", "layer", "k"), indices),
            "values": (("token", "layer", "k"), values),
            "trainable": (("token",), np.ones(n_tokens, bool)),
            "sequence": (("token",), np.repeat(np.arange(8), 20)),
        }
    )


@pytest.mark.parametrize(("one_layer", "want"), [(True, 0.0), (False, 1.0)], ids=["one-layer", "spread"])
@pytest.mark.parametrize("offset", [0.0, 12.0])
def test_planted_latents_give_the_known_spread(one_layer: bool, want: float, offset: float) -> None:
    from mlsae_analyze.findings import spread_finding

    summary = compute_variance(planted(one_layer), VarianceParams(2, layer_offset=offset), scheduler="sync").summary
    assert summary.rel_var_token == pytest.approx(want, abs=1e-12)
    assert summary.window["rel_var_t"] == pytest.approx(want, abs=1e-12)
    assert spread_finding(summary.rel_var_token, "rel_var_token", "pooled").verdict == (
        "agrees" if one_layer else "differs"
    )
    assert summary.multi_layer["by_share"]["0.1"] == 1.0  # every latent fires at every layer over the tokens
