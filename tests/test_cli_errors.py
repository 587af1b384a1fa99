"""Bad inputs through the ``eos`` entry point (issue 18.4, 18.5): each is caught
before anything starts, as one line on stderr naming the file, flag or field,
exit status 2, no traceback, and nothing on disk changed."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

MISSING_WEIGHTS = ("eval.every: 5 needs the Inception-v3 weights for FID/IS/KID, not found (looked for "
                   "{tmp}/torch/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth, "
                   "{tmp}/torch/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth); set eval.inception_weights, "
                   "or eval.every: 0 (python -m trainers.run.fid fetch downloads them)")
TRAIN = "eos train: invalid config: "
INPUT = "eos train: "   # the checks of trainers/run/preflight.py (data, Inception weights, device)
SPEC = "eos study run: invalid spec: "
NPZ = ["--set", "data.name=npz"]

# (command line, the one line of stderr); {tmp} is the test's folder (the working folder)
CASES = [
    # eos train: flags
    (["train", "--foo"], "eos train: error: unrecognized arguments: --foo"),
    (["train", "--base", "--lr", "abc"], "eos train: error: argument --lr: invalid float value: 'abc'"),
    (["train", "--base", "--lr", "-1"], TRAIN + "optim.lr: must be a finite number > 0; got -1.0"),
    (["train", "--steps", "0"], TRAIN + "train.steps: must be >= 1; got 0"),
    (["train", "--set", "train.steps=[1"],
     TRAIN + "--set 'train.steps=[1': the value is not valid YAML (expected ',' or ']', but got '<stream end>')"),
    (["train", "--set", "train.steps"], TRAIN + "--set 'train.steps': expected section.key=value"),
    (["train", "--set", "train.stepz=3"], TRAIN + "train.stepz: unknown key (known: bf16, checkpoint_every, "
     "device, divergence_loss, ema_decay, fixed_noise, keep_checkpoints, print_every, seed, steps)"),
    (["train", "--set", "data.name=imagenet"],
     TRAIN + "data.name: must be one of synthetic, cifar10, npz, imagefolder; got 'imagenet'"),
    (["train", "--set", "data.image_size=30"], TRAIN + "data.image_size: must be a multiple of 8 and >= 8; got 30"),
    # eos train: files
    (["train", "--config", "nope.yaml"], TRAIN + "--config: no such file 'nope.yaml'"),
    (["train", "--config", "corrupt.yaml"], TRAIN + "--config: corrupt.yaml:4: invalid YAML (expected ',' or ']', "
     "but got ':', while parsing a flow sequence from line 3)"),
    (["train", "--config", "list.yaml"], TRAIN + "--config: 'list.yaml' must hold a mapping"),
    (["train", *NPZ, "--set", "data.path=missing.npz"], INPUT + "data.path: no such file 'missing.npz'"),
    (["train", *NPZ, "--set", "data.path=notzip.npz"],
     INPUT + "data.path: 'notzip.npz' is not a readable .npz archive (BadZipFile: File is not a zip file)"),
    (["train", *NPZ, "--set", "data.path=wrongkey.npz"],
     INPUT + "data.path: 'wrongkey.npz' has no array named 'x_train' or 'images' or 'x' (its arrays: pictures)"),
    (["train", *NPZ, "--set", "data.path=float.npz"],
     INPUT + "data.path: float.npz:x_train must hold uint8 images; got dtype float32"),
    (["train", *NPZ, "--set", "data.path=small.npz"],
     INPUT + "data.batch_size: 16 is larger than the data set (10 images)"),
    (["train", *NPZ, "--set", "data.path=small.npz", "--set", "data.subset=11"],
     INPUT + "data.subset: 11 is larger than the data set (10 images)"),
    (["train", "--set", "data.synthetic_size=8"], INPUT + "data.batch_size: 16 is larger than the data set (8 images)"),
    (["train", "--set", "data.name=imagefolder", "--set", "data.path=images"],
     INPUT + "data.path: cannot read image 'images/b.png' (UnidentifiedImageError)"),
    (["train", "--set", "data.name=imagefolder", "--set", "data.path=empty"],
     INPUT + "data.path: no image files under 'empty'"),
    (["train", "--set", "eval.every=5"], INPUT + MISSING_WEIGHTS),
    (["train", "--set", "train.device=cuda"],
     INPUT + "train.device: 'cuda' requested but this machine has no CUDA GPU (use train.device=cpu or auto)"),
    # eos sample
    (["sample", "run", "--n", "0"], "eos sample: error: argument --n: must be >= 1; got 0"),
    (["sample", "run", "--sampler-steps", "0"], "eos sample: error: argument --sampler-steps: must be >= 1; got 0"),
    (["sample", "run", "--sampler", "euler"], "eos sample: error: argument --sampler: invalid choice: 'euler' "
     "(choose from 'ddpm', 'ddim', 'heun', 'dpmpp2m')"),
    (["sample", "empty"], "eos sample: empty has no config.json (not a run folder)"),
    (["sample", "damaged"], "eos sample: damaged/config.json is not readable (JSONDecodeError)"),
    # eos study
    (["study", "run", "nope.yaml"], SPEC + "spec: no such file 'nope.yaml' (presets: boundary, optuna, paper, smoke)"),
    (["study", "run", "corrupt.yaml"], SPEC + "spec: corrupt.yaml:4: invalid YAML (expected ',' or ']', but got ':', while parsing a flow "
     "sequence from line 3)"),
    (["study", "run", "smoke", "--dry-run", "--name", "n" * 400],
     SPEC + "study.name: must be at most 255 bytes (it names a folder); got 400: " + repr("n" * 40) + "..."),
    (["study", "run", "smoke", "--dry-run", "--set", "study.variants=[base, foo]"],
     SPEC + "study.variants[1]: unknown variant 'foo' (known: base, edm, vparam, snr, pd, adap_s, stf)"),
    (["study", "run", "smoke", "--dry-run", *NPZ, "--set", "data.path=wrongkey.npz"],
     SPEC + "data.path: '{tmp}/wrongkey.npz' has no array named 'x_train' or 'images' or 'x' (its arrays: pictures)"),
    (["study", "run", "smoke", "--dry-run", *NPZ, "--set", "data.path=small.npz"],
     SPEC + "data.batch_size: 16 is larger than the data set (10 images)"),
    (["study", "run", "smoke", "--dry-run", "--set", "eval.every=5"], SPEC + MISSING_WEIGHTS),
    (["study", "run", "smoke", "--dry-run", "--set", "resources.gpu=1", "--set", "train.device=cuda"],
     "eos study run: train.device: 'cuda' requested but this machine has no CUDA GPU (use train.device=cpu or auto)"),
    (["study", "run", "smoke", "--set", "resources.gpu=1"],   # refused before Ray starts
     "eos study run: resources.gpu: 1 GPU per trial, but this machine has no GPU; set resources.gpu: 0 to train "
     "on CPUs, or run on a Ray cluster with --address"),
    (["study", "run", "smoke", "--dry-run", "--set", "search.lr.grid=[1"], "eos study run: invalid spec: --set "
     "'search.lr.grid=[1': the value is not valid YAML (expected ',' or ']', but got '<stream end>')"),
    (["study", "resume", "nowhere"], "eos study resume: study: no study folder 'nowhere' (looked for "
     "nowhere/study.json, results/nowhere/study.json)"),
    # eos report, eos schema
    (["report", "nowhere"], "eos report: no such study or run folder: nowhere"),
    (["report", "damaged-run"], "eos report: damaged-run/steps: part-000000000-000000001.parquet is damaged "
     "(Parquet magic bytes not found in footer. Either the file is corrupted or this is not a parquet file.)"),
    (["schema", "--format", "xml"], "eos schema: error: argument --format: invalid choice: 'xml' "
     "(choose from 'text', 'markdown', 'json')"),
]


def _bad_inputs(tmp: Path) -> None:
    """The files the cases name, and a finished-looking run folder that must survive."""
    (tmp / "corrupt.yaml").write_text("train:\n  steps: 3\n  lrs: [1, 2\nmodel: {}\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "notzip.npz").write_text("not a zip archive")
    np.savez(tmp / "wrongkey.npz", pictures=np.zeros((10, 16, 16, 3), np.uint8))
    np.savez(tmp / "float.npz", x_train=np.zeros((10, 16, 16, 3), np.float32))
    np.savez(tmp / "small.npz", x_train=np.zeros((10, 16, 16, 3), np.uint8))
    (tmp / "images").mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp / "images" / "a.png")
    (tmp / "images" / "b.png").write_bytes(b"\x89PNG but not really")
    (tmp / "empty").mkdir()
    (tmp / "damaged").mkdir()
    (tmp / "damaged" / "config.json").write_text("{\"model\": ")
    (tmp / "run").mkdir()
    steps = tmp / "damaged-run" / "steps"
    steps.mkdir(parents=True)
    (tmp / "damaged-run" / "config.json").write_text(json.dumps({"variant": {"name": "base"}}))
    (steps / "part-000000000-000000001.parquet").write_bytes(b"PAR1 cut short")
    kept = tmp / "results" / "runs" / "base_lr0.001_s0"   # a result of an earlier run: must stay as it is
    (kept / "steps").mkdir(parents=True)
    (kept / "config.json").write_text("{}")
    (kept / "status.json").write_text(json.dumps({"status": "completed", "steps_done": 20}))
    (kept / "steps" / "part-000000000-000000019.parquet").write_bytes(b"rows")


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-inputs")
    _bad_inputs(tmp)
    return tmp


def test_the_table_has_at_least_30_bad_inputs():
    assert len(CASES) >= 30


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_a_bad_input_is_one_line_naming_it(argv, message, workdir, monkeypatch, capsys):
    from study.cli import main

    monkeypatch.chdir(workdir)
    monkeypatch.setenv("TORCH_HOME", str(workdir / "torch"))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    before = _tree(workdir)
    try:
        rc = main(argv)
    except SystemExit as exit:   # argparse: usage, then one error line
        rc = exit.code
    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2
    assert "Traceback" not in captured.err + captured.out
    expected = message.format(tmp=workdir)
    assert err_lines[-1] == expected
    if not err_lines[0].startswith("usage:"):
        assert len(err_lines) == 1
    assert _tree(workdir) == before          # nothing on disk lost, changed or added


def test_the_dry_run_says_a_gpu_share_does_not_fit_this_machine(workdir, monkeypatch, capsys):
    from study.cli import main

    monkeypatch.chdir(workdir)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    before = _tree(workdir)
    assert main(["study", "run", "smoke", "--dry-run", "--set", "resources.gpu=1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == ("  not on this machine: resources.gpu: 1 GPU per trial, but this machine has no GPU; set "
                      "resources.gpu: 0 to train on CPUs, or run on a Ray cluster with --address")
    assert _tree(workdir) == before
