"""Checks against the released ArmoRM weights; runs only when ARMORM_MODEL_PATH points to them.

Figures from the model card (docs/model.md, 'Figures the released weights
reproduce'), printed there by the real model in bf16 on a GPU; armorm holds
bf16 weights and accumulates in fp32, so the tolerances allow for that
difference in rounding.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import armorm

MODEL_PATH = os.environ.get("ARMORM_MODEL_PATH")
pytestmark = pytest.mark.skipif(not MODEL_PATH, reason="ARMORM_MODEL_PATH is not set (needs the real "
                                "RLHFlow/ArmoRM-Llama3-8B-v0.1 weights, a 16 GB download)")

PROMPT = 'What are some synonyms for the word "beautiful"?'
RESPONSE = "Nicely, Beautifully, Handsome, Stunning, Wonderful, Gorgeous, Pretty, Stunning, Elegant"


def test_model_card_figures():
    rm = armorm.ArmoRMPipeline(MODEL_PATH, torch_dtype="bfloat16")
    assert rm.model.gating_pattern == armorm.LLAMA3_GATING_PATTERN
    out = rm.score_batch([[{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}]])
    top = rm.model.explain(out, 3)[0]
    assert [n for n, _ in top] == ["code-complexity", "helpsteer-verbosity", "ultrafeedback-instruction_following"]
    np.testing.assert_allclose([c for _, c in top], [0.19922, -0.10864, 0.07861], atol=0.01)
    helpsteer = out.rewards[0, :5] * 5 - 0.5
    np.testing.assert_allclose(helpsteer, [2.78125, 2.859375, 3.484375, 1.3847656, 1.296875], atol=0.1)
    assert np.isclose((out.rewards[0] * rm.model.coefficients(out.gating_output)[0]).sum(), out.score[0], atol=1e-3)
