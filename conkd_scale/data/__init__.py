"""Data layer: ReDial / INSPIRED / synthetic corpora, knowledge graphs, tokenizers, sequences."""

from conkd_scale.data.corpus import DATASETS, Corpus, corpus_stats, load_dataset

__all__ = ["DATASETS", "Corpus", "corpus_stats", "load_dataset"]
