import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tiny tensors: one thread avoids oversubscribing the two shared cores
torch.set_num_threads(1)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
