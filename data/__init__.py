"""MSA training data: local readers, synthetic tasks, sample builders, pre-tokenised
shards and the packed-row streaming loader (``data``)."""

from .build import BuildConfig, SourceConfig, build_dataset
from .errors import BadRecordTally, DataFormatError, MissingFileError, OverlongExampleError
from .loader import ROW_FIELDS, PackedRowLoader, PreparedDataset, stack_rows
from .records import Document, RetrievalDataset, RetrievalRecord
from .samples import MemoryConfig, SampleKind
from .templates import ChatFormat, TemplateConfig
from .tokenization import HuggingFaceTokenizer, SentencePieceTokenizer, TextTokenizer, load_tokenizer

__all__ = [
    "BadRecordTally",
    "BuildConfig",
    "ChatFormat",
    "DataFormatError",
    "Document",
    "HuggingFaceTokenizer",
    "MemoryConfig",
    "MissingFileError",
    "OverlongExampleError",
    "PackedRowLoader",
    "PreparedDataset",
    "ROW_FIELDS",
    "RetrievalDataset",
    "RetrievalRecord",
    "SampleKind",
    "SentencePieceTokenizer",
    "SourceConfig",
    "TemplateConfig",
    "TextTokenizer",
    "build_dataset",
    "load_tokenizer",
    "stack_rows",
]
