"""armorm: ArmoRM-style multi-objective reward models on a C core.

    model = armorm.ArmoRM.from_pretrained(path)          # drop-in for the HF class
    rm = armorm.ArmoRMPipeline(path)                     # the model card's pipeline
    rm([{"role": "user", ...}, {"role": "assistant", ...}])["score"]
    armorm.plot.objectives(rm.score_batch(conversations))   # with the `plot` extra (matplotlib)
"""
from .config import ATTRIBUTES, CheckpointError
from .hub import DEFAULT_MODEL, ModelNotFoundError
from .model import LLAMA3_GATING_PATTERN, ArmoRM, GatingPatternError, RewardOutput
from .pipeline import ArmoRMPipeline
from .tokenizer import ChatTokenizer, gating_pattern

__all__ = ["ATTRIBUTES", "ArmoRM", "ArmoRMPipeline", "ChatTokenizer", "CheckpointError", "DEFAULT_MODEL",
           "GatingPatternError", "LLAMA3_GATING_PATTERN", "ModelNotFoundError", "RewardOutput", "gating_pattern"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # armorm.plot needs matplotlib (the `plot` extra): imported on first use, not with armorm
    if name == "plot":
        import importlib
        return importlib.import_module(".plot", __name__)
    raise AttributeError(f"module 'armorm' has no attribute {name!r}")

