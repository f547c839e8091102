import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tiny tensors: one thread avoids oversubscribing shared cores; OMP_NUM_THREADS=2 (say) runs the suite with
# two, to check that no tolerance depends on the thread count
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
