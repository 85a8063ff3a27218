"""The EnCLAP captioner: BART over codec tokens, its config, its tokenizers, import of published checkpoints."""
