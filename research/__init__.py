"""A JAX/Flax research codebase for fine-tuning: model merging, packing, NEFTune, LoRA.

``research.generate`` is ``research.generation.generate`` (imported on first use).
"""


def __getattr__(name):
    if name == "generate":
        from research.generation import generate

        return generate
    raise AttributeError(f"module 'research' has no attribute {name!r}")
