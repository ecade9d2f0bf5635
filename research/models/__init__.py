"""The packed-sequence transformer, its attention backends and HF checkpoint I/O.

``research.models.attention`` (the module) holds ``attention(q, k, v, segment_ids, implementation=...)``.
"""

from research.models import attention
from research.models.config import PRESETS, ModelConfig, preset
from research.models.hf import CheckpointError, checkpoint_files, from_hf, save_hf
from research.models.transformer import Transformer

__all__ = ["PRESETS", "CheckpointError", "ModelConfig", "Transformer", "attention", "checkpoint_files", "from_hf", "preset", "save_hf"]
