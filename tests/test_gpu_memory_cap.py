"""A trial holding a fraction of a GPU allocates at most that share of its
memory (study.trainable.cap_gpu_memory), and at the limit PyTorch frees the
trial's own cached blocks instead of failing."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from study import trainable
from study.trainable import GPU_MEMORY_HEADROOM, cap_gpu_memory


def test_whole_gpus_and_the_cpu_are_not_capped(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda *a: calls.append(a))
    assert cap_gpu_memory(0.25, "cpu") is None
    assert cap_gpu_memory(1.0, "cuda:0") is None
    assert cap_gpu_memory(2.0, "cuda:0") is None
    assert cap_gpu_memory(0.0, "cuda:0") is None
    assert calls == []


def test_a_gpu_slice_caps_the_allocator_at_its_share_less_the_headroom(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda *a: calls.append(a))
    assert cap_gpu_memory(0.25, "cuda:1") == pytest.approx(0.25 * (1 - GPU_MEMORY_HEADROOM))
    assert calls == [(pytest.approx(0.24), 1)]


def test_a_trial_on_a_gpu_slice_sets_the_cap_before_training(monkeypatch, tmp_path):
    """run_trial applies the slice's cap (on a machine with CUDA) before its trainer exists."""
    ray = pytest.importorskip("ray")  # noqa: F841  (run_trial imports ray.tune)
    from study.layout import StudyLayout
    from study.spec import spec_from_dict
    from test_study_spec import small_spec

    spec = spec_from_dict(small_spec(study={"name": "cap", "storage": str(tmp_path)},
                                     resources={"cpu": 1, "gpu": 0.25, "max_concurrent": 1, "mps": False},
                                     train={"steps": 1, "device": "cuda"}))
    seen = []

    class Stop(Exception):
        pass

    def fake_train(*args, **kwargs):
        seen.append("train")
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trainable, "cap_gpu_memory", lambda gpu, device: seen.append(("cap", gpu, str(device))))
    monkeypatch.setattr("trainers.run.loop.train", fake_train)
    monkeypatch.setattr("trainers.run.preflight.check_run_inputs", lambda cfg: None)
    monkeypatch.setattr("ray.tune.get_checkpoint", lambda: None)
    layout = StudyLayout(spec.study_dir)
    plan = trainable.TrialPlan(spec=spec, root=str(layout.root), single=True)
    with pytest.raises(Stop):
        trainable.run_trial({"variant": "base", "lr": 1e-3, "seed": 0}, plan)
    assert seen == [("cap", 0.25, "cuda"), "train"]


CHILD = textwrap.dedent("""
    import torch
    from study.trainable import cap_gpu_memory
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = cap_gpu_memory(0.25, "cuda")
    limit = fraction * total
    try:
        torch.empty(int(0.3 * total), dtype=torch.uint8, device="cuda")
        raise SystemExit("an allocation above the trial's share succeeded")
    except torch.OutOfMemoryError:
        pass
    a = torch.empty(int(0.15 * total), dtype=torch.uint8, device="cuda")
    del a   # cached by the allocator, not returned to the driver
    assert torch.cuda.memory_reserved() >= 0.15 * total
    b = torch.empty(int(0.2 * total), dtype=torch.uint8, device="cuda")   # cache + b exceed the cap
    assert torch.cuda.memory_reserved() <= limit, (torch.cuda.memory_reserved(), limit)
    print("ok", fraction)
""")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_the_cap_holds_and_the_trials_cache_is_freed_to_stay_under_it():
    """In a fresh process (the cap is per process): an allocation above the
    share fails; one that fits only without the cached blocks succeeds."""
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")
