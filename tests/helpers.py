"""Builders used by several test modules."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

FIXTURES = Path(__file__).resolve().parent.parent / "data" / "fixtures"
with open(FIXTURES / "tiny_models.toml", "rb") as _f:
    TINY_MODELS = tomllib.load(_f)
TINY = TINY_MODELS["model"]

T = TypeVar("T")


def tokenizer_corpus() -> list[str]:
    """A few hundred short documents from the pydoc corpus."""
    from pydoc_data.topics import topics

    return [topics[k][:600] for k in sorted(topics)][: TINY_MODELS["tokenizer"]["documents"]]


def make_tokenizer(path: Path):  # noqa: ANN201 - a transformers tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_MODELS["tokenizer"]["vocab_size"],
        special_tokens=TINY_MODELS["tokenizer"]["special_tokens"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    fast.save_pretrained(path)
    return fast


def make_tiny_model(path: Path, arch: str) -> Path:
    """A random model of architecture `arch` ('gpt_neox' or 'llama') saved with its tokenizer in `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = make_tokenizer(path)
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TINY,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return path


STATS_TOLERANCE = 1e-6
"""A cache's statistics sum blocks of 64 rows in float32: at worst 64 float32 roundings off the exact sum (4e-6 of
the block's sum of |x|), 2e-9 measured on normal data; 1e-6 still catches a lost block or a sum in float16."""


def assert_statistics_close(mean: np.ndarray, sq_norm: np.ndarray, x: np.ndarray) -> None:
    """A cache's `layer_mean` [layer, d] and `layer_sq_norm` [layer] against float64 ones of x [token, layer, d]."""
    x = x.astype(np.float64)
    np.testing.assert_array_less(np.abs(mean - x.mean(axis=0)), STATS_TOLERANCE * np.abs(x).mean(axis=0) + 1e-300)
    np.testing.assert_allclose(sq_norm, (x**2).sum(axis=2).mean(axis=0), rtol=STATS_TOLERANCE)


def per_thread_count(compute: Callable[[], T], counts: tuple[int, ...] = (1, 2, 3)) -> list[T]:
    """compute() run with each of torch's intra-op thread `counts` in turn (the count restored after)."""
    before = torch.get_num_threads()
    try:
        results = []
        for threads in counts:
            torch.set_num_threads(threads)
            results.append(compute())
    finally:
        torch.set_num_threads(before)
    return results
