"""CUDA MPS for trials that share a GPU.

Trials on one GPU are separate processes; without NVIDIA's Multi-Process
Service their kernels time-slice the GPU, with it they run concurrently
(bench/RESULTS.md: four trials per GPU with λ₁ at every step gain 2.6–3.5×
over one trial under MPS, 1.15–2.1× time-sliced).

:func:`study_mps` is what ``eos study run`` and ``eos study resume`` enter
before Ray starts: for a study on this machine (no ``--address``) whose
trials take a fraction of a GPU (``0 < resources.gpu < 1``) and with
``resources.mps`` null (the default: when it can) or ``true``, it starts a private MPS
control daemon — its own pipe and log folders under a temporary folder, the
GPU's compute mode untouched — puts ``CUDA_MPS_PIPE_DIRECTORY`` into the
environment that Ray's workers inherit, and quits that daemon at exit.  It
never starts a second daemon beside one that is already serving this
environment's pipe folder, and never stops a daemon it did not start.  On a
cluster (``--address``) the nodes start their own (clusters/README.md).

The driver itself must not be an MPS client (a client's CUDA context would
make the daemon's ``quit`` wait for it): nothing here touches CUDA; GPUs are
counted with ``nvidia-smi``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

CONTROL = "nvidia-cuda-mps-control"
DEFAULT_PIPE = "/tmp/nvidia-mps"   # the pipe folder a daemon started without CUDA_MPS_PIPE_DIRECTORY uses


@dataclass(frozen=True)
class MPSPlan:
    """Whether a study starts its own MPS daemon, and why (one line for the console)."""
    start: bool
    reason: str


def gpu_count() -> int:
    """GPUs ``nvidia-smi -L`` lists (0 when it is missing or fails), without a CUDA context."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def running_daemon(environ: Optional[dict] = None) -> Optional[str]:
    """The pipe folder of an MPS control daemon already serving this
    environment (``CUDA_MPS_PIPE_DIRECTORY``, else the default folder), or None."""
    environ = os.environ if environ is None else environ
    pipe = environ.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE
    return pipe if (Path(pipe) / "control").exists() else None


def plan(mode: Optional[bool], gpu_share: float, *, cluster: bool, environ: Optional[dict] = None,
         which: Callable[[str], Optional[str]] = shutil.which, gpus: Callable[[], int] = gpu_count) -> MPSPlan:
    """Whether to start a private daemon for a study whose trials take
    ``gpu_share`` GPUs each; ``mode`` is ``resources.mps`` (None: when it
    can, True: required, False: never).  With ``mode`` True and no way to
    start one, a :class:`trainers.config.ConfigError` naming the field."""
    from trainers.config import ConfigError

    def unavailable(reason: str) -> MPSPlan:
        if mode:
            raise ConfigError(f"resources.mps: true, but {reason}; set resources.mps: null to go on without MPS")
        return MPSPlan(False, f"CUDA MPS not started: {reason}; trials sharing a GPU time-slice it")

    if mode is False:
        return MPSPlan(False, "CUDA MPS off (resources.mps: false): trials sharing a GPU time-slice it")
    if not 0 < gpu_share < 1:
        return MPSPlan(False, "no GPU is shared between trials (resources.gpu is 0 or whole GPUs): no MPS")
    if cluster:
        return MPSPlan(False, "on a Ray cluster each node starts its own MPS daemon (clusters/README.md)")
    pipe = running_daemon(environ)
    if pipe is not None:
        return MPSPlan(False, f"CUDA MPS: the control daemon already running (pipe {pipe}) serves the trials; "
                              "it is left running at exit")
    if which(CONTROL) is None:
        return unavailable(f"{CONTROL} is not on PATH (it comes with the NVIDIA driver)")
    if gpus() == 0:
        return unavailable("nvidia-smi lists no GPU")
    return MPSPlan(True, "CUDA MPS: a private control daemon serves the trials sharing each GPU")


@contextlib.contextmanager
def private_daemon(exe: str, *, quit_timeout: float = 60.0, log: Callable[[str], None] = print) -> Iterator[str]:
    """Start an MPS control daemon with its own pipe and log folders, set
    ``CUDA_MPS_PIPE_DIRECTORY``/``CUDA_MPS_LOG_DIRECTORY`` for the processes
    started inside the block, and quit the daemon and restore the environment
    on exit.  Yields the pipe folder."""
    root = tempfile.mkdtemp(prefix="eos-mps-")
    env = {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(root, "pipe"), "CUDA_MPS_LOG_DIRECTORY": os.path.join(root, "log")}
    saved = {k: os.environ.get(k) for k in env}
    for d in env.values():
        os.makedirs(d)
    os.environ.update(env)
    started = False
    try:
        subprocess.run([exe, "-d"], check=True, timeout=30)
        started = True
        log(f"[eos] CUDA MPS: started a private control daemon (pipe {env['CUDA_MPS_PIPE_DIRECTORY']}); "
            "it quits when the study ends")
        yield env["CUDA_MPS_PIPE_DIRECTORY"]
    finally:
        if started:
            try:   # "quit" waits for the daemon's clients (the trials) to exit
                subprocess.run([exe], input=b"quit\n", check=False, timeout=quit_timeout)
            except subprocess.TimeoutExpired:
                log(f"[eos] CUDA MPS: the daemon still had clients after {quit_timeout:g} s; it quits when they exit")
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def study_mps(mode: Optional[bool], gpu_share: float, *, cluster: bool,
              log: Callable[[str], None] = print) -> Iterator[MPSPlan]:
    """The MPS arrangement of one study run (see the module docstring),
    said in one line when trials share a GPU.  Enter before Ray starts."""
    decision = plan(mode, gpu_share, cluster=cluster)
    if not decision.start:
        if 0 < gpu_share < 1 and not cluster:
            log(f"[eos] {decision.reason}")
        yield decision
        return
    with private_daemon(shutil.which(CONTROL), log=log):
        yield decision
