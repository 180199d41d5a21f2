"""Data pipeline: sources -> tokenizer -> prepared token files -> deterministic batches."""

from megaloom.data.loader import BatchLoader, TokenDataset, eval_batches
from megaloom.data.prepare import CorpusInfo, load_corpus_info, prepare_corpus
from megaloom.data.sources import STDLIB, DataError, Document, iter_documents
from megaloom.data.tokenizer import Tokenizer, gpt2_tokenizer, load_tokenizer, train_bpe

__all__ = [
    "STDLIB",
    "BatchLoader",
    "CorpusInfo",
    "DataError",
    "Document",
    "TokenDataset",
    "Tokenizer",
    "eval_batches",
    "gpt2_tokenizer",
    "iter_documents",
    "load_corpus_info",
    "load_tokenizer",
    "prepare_corpus",
    "train_bpe",
]
