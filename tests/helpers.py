"""Builders used by several test modules."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64}


def tokenizer_corpus() -> list[str]:
    """A few hundred short documents from the pydoc corpus."""
    from pydoc_data.topics import topics

    return [topics[k][:600] for k in sorted(topics)][:120]


def make_tokenizer(path: Path):  # noqa: ANN201 - a transformers tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<bos>", "<eos>"],
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
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TINY,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return path
