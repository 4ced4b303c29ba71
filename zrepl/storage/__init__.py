"""Storage: the WAL and metadata of a node (``MemoryStorage``, the in-memory
twin, and ``FileStorage``), checkpoint files, and file-system helpers."""

from .base import MemoryStorage
from .file import FileStorage

__all__ = ["FileStorage", "MemoryStorage"]
