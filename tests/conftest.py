import pytest
import torch

# The CI machine has 2 cores; one intra-op thread per test process avoids oversubscription.
torch.set_num_threads(1)  # Ray workers and subprocess tests share the 2 cores


def tiny_config(**sections) -> dict:
    """A CPU-sized run config: tiny U-Net, 16×16 synthetic images, on the CPU
    (whose kernels are deterministic: tests compare runs bit for bit, also on
    a machine with a GPU)."""
    from trainers.config import merge

    base = {
        "model": {"preset": "tiny"},
        "data": {"name": "synthetic", "image_size": 16, "synthetic_size": 64, "batch_size": 16},
        "sharpness": {"every": 0},
        "train": {"steps": 20, "checkpoint_every": 10, "print_every": 0, "device": "cpu"},
        "optim": {"name": "adam", "lr": 1e-3},
    }
    return merge(base, sections)


@pytest.fixture
def tiny():
    return tiny_config
