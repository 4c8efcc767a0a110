"""Training ArmoRM-style heads on armorm's engine, for notebooks as for the command line.

    from armorm.train import stage1, stage2
    path = stage1.prepare("FsfairX-LLaMA3-RM-v0.1/", "data.jsonl", "embeddings/")   # docs/stage1.md
    result = stage1.train("embeddings/*.safetensors", "regression.safetensors")
    print(result.table())
    stage2.prepare(...); stage2.train(...)                                          # docs/stage2.md

- `stage1`: stage 1, embeddings and the multi-objective ridge regression;
- `stage2`: stage 2, pair embeddings, verbosity debiasing, the gating network;
- `prepare`: the sharded, resumable embedding loop both stages' `prepare` run;
- `ridge`: the linear algebra of stage 1 (Gram accumulation, solvers);
- `rewardbench`: RewardBench scoring; `assemble`: a checkpoint from the parts.

Each stage's functions keep its module's name (`stage1.train`, `stage2.train`):
nothing here is a bare `train` or `prepare` that would mean one stage.
"""
from . import stage1, stage2

__all__ = ["stage1", "stage2"]
