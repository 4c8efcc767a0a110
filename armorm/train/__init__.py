"""Training ArmoRM-style heads on armorm's engine.

Stage 1 (docs/stage1.md), for notebooks as for the command line:

    from armorm.train import stage1
    path = stage1.prepare("FsfairX-LLaMA3-RM-v0.1/", "data.jsonl", "embeddings/")
    result = stage1.train("embeddings/*.safetensors", "regression.safetensors")
    print(result.table())
"""
from . import stage1
from .stage1 import DEFAULT_ALPHAS, Stage1Result, prepare, train, train_test_split_indices

__all__ = ["DEFAULT_ALPHAS", "Stage1Result", "prepare", "stage1", "train", "train_test_split_indices"]
