"""uts: Uninformed Teacher-Student hard-sample distillation for mitosis localization."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("uts")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
