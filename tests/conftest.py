import os

import pytest
import torch

# Two cores: keep each test process to one intra-op thread so parallel helpers and
# subprocesses do not oversubscribe the machine.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
