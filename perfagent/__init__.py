"""perfagent: a Prometheus-native performance agent for LLM inference fleets."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("perfagent")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
