"""Training: the shared loop, optimiser, the captioner and retriever trainers, their losses, soups."""
