"""ds01_spawner: a JupyterHub spawner for shared multi-GPU lab servers."""

from .configure import configure
from .spawner import DS01Spawner

__all__ = ["DS01Spawner", "configure"]
__version__ = "0.1.0"
