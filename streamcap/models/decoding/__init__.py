"""Caption decoding: token decoders (nucleus sampling, beam search), output ensembles, the fluency filter and reranking."""
