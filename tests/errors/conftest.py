"""Fixtures of the bad-input tests: a pristine tiny ArmoRM checkpoint (and a sharded one), copies to
corrupt, a loaded model."""
from __future__ import annotations

import shutil

import pytest

import armorm
from bad_input import PATTERN, TINY
from checkpoints import make_armorm


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A pristine tiny ArmoRM checkpoint (never modified: tests corrupt copies)."""
    return make_armorm(tmp_path_factory.mktemp("errors") / "base", **TINY).path


@pytest.fixture(scope="module")
def base_sharded(tmp_path_factory):
    return make_armorm(tmp_path_factory.mktemp("errors") / "sharded", shards=2, **TINY).path


@pytest.fixture
def ckpt(base, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(base, d)
    return d


@pytest.fixture
def sharded(base_sharded, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(base_sharded, d)
    return d


@pytest.fixture(scope="module")
def model(base):
    m = armorm.ArmoRM.from_pretrained(base, gating_pattern=PATTERN, num_threads=1)
    yield m
    m.close()
