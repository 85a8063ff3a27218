"""Training and evaluation: data, features, metrics, trainers."""
