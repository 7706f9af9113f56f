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


@pytest.fixture(autouse=True)
def _no_leaked_grad_mode():
    """A test (or the code it calls in-process) must not leave autograd switched off."""
    yield
    leaked = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "autograd was left disabled (torch.set_grad_enabled(False) without restoring)"
