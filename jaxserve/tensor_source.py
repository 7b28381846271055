"""`TensorSource`: a checkpoint seen as Hugging Face tensors, whatever its file format.

The weight converter reads safetensors directories and GGUF files through this one shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class TensorSource:
    """A checkpoint seen as Hugging Face tensors: names and shapes up front, data on demand.

    `reader()` yields (name, array) one at a time in file order; each array is only valid until
    the next is requested (it may be a view of a memory map or of a shared dequantized block).
    `write_tokenizer(out)` writes the checkpoint's tokenizer files (if any) into `out`.
    """

    path: Path
    format: str  # "safetensors" | "gguf"
    hf_config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    reader: Callable[[], Iterator[tuple[str, np.ndarray]]] = field(repr=False)
    write_tokenizer: Callable[[Path], None] = field(repr=False)
