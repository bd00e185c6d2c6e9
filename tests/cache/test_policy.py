"""One trainable-token rule: the policy itself, table-driven, and the three places that rebuild masks from tokens
(the harvest, splicing on fresh text, the prompt heatmap) agree with it and with the policy a cache records."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mlsae_analyze.prompt import prompt_tokens
from mlsae_cache.harvest import run_harvest
from mlsae_cache.policy import HARVEST_POLICY, IMPORT_POLICY, TrainablePolicy
from mlsae_cache.store import Cache
from mlsae_cache.text import TextSpec
from mlsae_train.splice import text_window_batches
from tests.cache.conftest import small_config

SPECIAL = (1, 2)
POLICIES = {
    "harvest": HARVEST_POLICY,
    "special-only": TrainablePolicy(exclude_special_tokens=True, exclude_position_0=False),
    "position-0-only": TrainablePolicy(exclude_special_tokens=False, exclude_position_0=True),
    "import": IMPORT_POLICY,
}


@pytest.mark.parametrize(
    ("policy", "token_ids", "position", "want"),
    [
        ("harvest", [2, 5, 6, 1, 7], [0, 1, 2, 3, 4], [0, 1, 1, 0, 1]),
        ("harvest", [5, 6, 7], [3, 0, 1], [1, 0, 1]),
        ("special-only", [2, 5, 6, 1, 7], [0, 1, 2, 3, 4], [0, 1, 1, 0, 1]),
        ("special-only", [5, 6, 7], [0, 1, 2], [1, 1, 1]),
        ("position-0-only", [2, 5, 6, 1, 7], [0, 1, 2, 3, 4], [0, 1, 1, 1, 1]),
        ("position-0-only", [5, 6, 7], [1, 0, 2], [1, 0, 1]),
        ("import", [2, 5, 6, 1, 7], [0, 1, 2, 3, 4], [1, 1, 1, 1, 1]),
    ],
    ids=["harvest", "harvest-mid-window", "special", "special-no-sep", "pos0", "pos0-mid", "import"],
)
def test_policy_masks(policy: str, token_ids: list[int], position: list[int], want: list[int]) -> None:
    got = POLICIES[policy].mask(np.array(token_ids), np.array(position), SPECIAL)
    np.testing.assert_array_equal(got, np.array(want, bool))


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_round_trips_and_defaults_to_excluding(name: str) -> None:
    policy = POLICIES[name]
    assert TrainablePolicy.from_dict(policy.to_dict()) == policy
    assert TrainablePolicy.from_dict({}) == HARVEST_POLICY == TrainablePolicy.from_dict(None)
    windows = np.array([[2, 5, 1], [5, 6, 7]])
    want = np.stack([policy.mask(w, np.arange(3), SPECIAL) for w in windows])
    np.testing.assert_array_equal(policy.window_mask(windows, SPECIAL), want)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path], loaded_llama) -> Cache:  # noqa: ANN001
    out = tmp_path_factory.mktemp("policy") / "cache"
    run_harvest(small_config(out, tiny_models["llama"], max_tokens=256), loaded=loaded_llama)
    return Cache(out)


def test_the_harvest_marks_rows_by_its_recorded_policy(cache: Cache, loaded_llama) -> None:  # noqa: ANN001
    tokens = cache.tokens()
    special = loaded_llama.tokenizer.all_special_ids
    assert cache.meta.policy == HARVEST_POLICY
    np.testing.assert_array_equal(tokens.trainable, cache.meta.policy.mask(tokens.token_ids, tokens.position, special))
    assert not tokens.trainable[tokens.position == 0].any()


@pytest.mark.parametrize("name", list(POLICIES))
def test_splice_and_prompt_follow_the_cache_policy(cache: Cache, loaded_llama, name: str) -> None:  # noqa: ANN001
    """Given a cache of any policy, fresh windows for splicing and a prompt are marked by that policy."""
    policy, tokenizer = POLICIES[name], loaded_llama.tokenizer
    special = tokenizer.all_special_ids
    batch = next(text_window_batches(TextSpec("pydoc"), tokenizer, 32, policy, 2, 2))
    np.testing.assert_array_equal(batch.trainable, policy.window_mask(batch.token_ids, special))
    meta = replace(cache.meta, trainable_policy=policy.to_dict())
    ids, keep = prompt_tokens("The for statement is used to iterate", tokenizer, meta)
    np.testing.assert_array_equal(keep, policy.mask(ids, np.arange(len(ids)), special))
    assert keep[0] == (not policy.exclude_special_tokens and not policy.exclude_position_0)
