"""Shared fixtures: tiny random Llama configs and a small text corpus (no download, seconds per run)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from helpers import make_tiny_config

from podar import PruningConfig


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A ~40 kB English-like text file (seeded), enough for calibration and evaluation windows."""
    rng = random.Random(0)
    words = ("the model prunes weights of every layer while the calibration text flows through blocks and "
             "a mask keeps what matters most for the next token in each sentence of this small corpus").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 20))) + " ." for _ in range(400)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def tiny_config(corpus) -> PruningConfig:
    """A config that runs end to end on a 2-block random Llama in a few seconds."""
    return make_tiny_config(corpus)


@pytest.fixture
def config_file(tiny_config, tmp_path) -> Path:
    """The tiny config written as YAML, for the command-line tests."""
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_config.to_yaml())
    return path


@pytest.fixture(autouse=True)
def _reset_structlog():
    """The CLI configures structlog process-wide; give every test the library default back."""
    import structlog

    yield
    structlog.reset_defaults()
