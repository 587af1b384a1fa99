import os

import pytest

# cuBLAS is deterministic only with a fixed workspace, set before the first CUDA handle
# (the cuda_deterministic fixture); harmless without a GPU
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

# The CI machine has 2 cores; one intra-op thread per test process avoids oversubscription.
torch.set_num_threads(1)  # Ray workers and subprocess tests share the 2 cores


@pytest.fixture
def cuda_deterministic():
    """Deterministic CUDA kernels for the test (cuDNN's deterministic
    convolutions, PyTorch's deterministic alternatives where they exist).

    Tests that compare two CUDA training runs need it: with the default
    atomic-add reductions two identical runs differ by ~1e-7 in the
    gradients, and Adam's λ₁(P⁻¹H) in its opening steps, dominated by
    coordinates whose √v̂ is tiny, turns that into 0.2–0.8 % (measured on an
    H200 between two identical runs at step 2): the runs, not the code under
    test, would differ."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]


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
