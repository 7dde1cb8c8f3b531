"""Machine translation recipe (Multi30k de->en, or the self-generated synthetic corpus): data loading, the
joint BPE tokenizer, token-based batching; training, QAT, PTQ, export and BLEU build on these."""
