"""Model bundles: the manifest and files of a bundle, reading weights, presets."""
