"""The run's tokenizer: a local one, or a tiny byte-level BPE trained on the spot.

Template special strings (round delimiter, end of retrieval, chat markers) are made single
tokens once, here, and the result is saved in the run folder. Every data build and the
final export use that saved copy, so token ids never drift between stages.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data.tokenization import HuggingFaceTokenizer, TextTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"


def train_tiny_tokenizer(
    texts: Iterable[str], vocab_size: int, special_tokens: list[str], individual_digits: bool = False
) -> PreTrainedTokenizerFast:
    """A byte-level BPE with `vocab_size` ids (special tokens first), for tests and the tiny recipe.

    `individual_digits` makes every digit its own token, as Qwen's tokenizers do; otherwise BPE
    merges frequent digit groups, so a 7-digit number becomes an irregular run like `777|642|4`.
    """
    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if individual_digits
        else byte_level
    )
    backend.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys([EOS_TOKEN, *special_tokens]))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def prepare_tokenizer(
    directory: Path,
    special_strings: list[str],
    source_path: str | None,
    tiny_texts: Iterable[str] | None = None,
    tiny_vocab_size: int = 512,
    tiny_individual_digits: bool = False,
) -> TextTokenizer:
    """Load the run's tokenizer from `directory`, or create it there.

    It comes from `source_path` when given, otherwise it is trained on `tiny_texts`.
    `special_strings` are added as single tokens when missing (and logged by the data package).
    """
    if (directory / "tokenizer.json").is_file():
        return load_saved(directory, special_strings)
    if source_path is not None:
        tokenizer = load_tokenizer(source_path)
    else:
        if tiny_texts is None:
            raise ValueError("no tokenizer path given and no texts to train a tiny tokenizer on")
        tokenizer = HuggingFaceTokenizer(
            train_tiny_tokenizer(tiny_texts, tiny_vocab_size, special_strings, tiny_individual_digits)
        )
        logger.info("trained a tiny byte-level BPE tokenizer with %d ids", tokenizer.vocab_size)
    tokenizer.ensure_special_tokens(special_strings)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by a crash in an earlier attempt
    tokenizer.save(staging)
    staging.rename(directory)
    return load_saved(directory, special_strings)


def load_saved(directory: Path, special_strings: list[str]) -> TextTokenizer:
    """The saved run tokenizer, with its template tokens registered (they are already single ids)."""
    tokenizer = load_tokenizer(directory)
    tokenizer.ensure_special_tokens(special_strings)
    return tokenizer
