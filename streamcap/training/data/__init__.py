"""Training data: manifests, dataset converters, the synthetic demo corpus, audio reading, precomputed features."""
