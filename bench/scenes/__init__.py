"""An independent generator of evaluation scenes for the demo bundle.

Nothing here is shared with the training corpus (``streamcap/training/data``):
other synthesis code, other parameter ranges, other backgrounds, other mixing.
See :mod:`bench.scenes.generate` for the scene list.
"""
