"""streamcap: live natural-language captioning of everyday sound."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("streamcap")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
