"""What happens when...: every bad command line, config, data folder and checkpoint, as a table.

Each row runs `python -m pydc.train` (in process, through pydc.train.main; a few rows also as real subprocesses)
against an earlier run's output folder and asserts: exit status 2, exactly one error line naming the problem,
no traceback, and no file of the earlier run changed (size, mtime, hash). Rows refused while parsing the options
also prove that a fresh --output folder is not created. The same table is in the README ("What happens when...").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pydc.train
from pydc.data import FeatureLoader, ImageFolderIndex
from pydc.data.dali_backend import dali_available
from pydc.utils.checkpoint import FORMAT_VERSION
from tests.test_train import REPO, make_image_folder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::RuntimeWarning")

# Small enough that the earlier run takes seconds; rows override these (argparse keeps the last value). Rows
# with --config get only RUN_FLAGS, since flags override a config's values.
RUN_FLAGS = ["--threads", "1", "--workers", "1", "--device", "cpu", "--no-eval", "--no-plots"]
BASE_FLAGS = [*RUN_FLAGS, "--k", "3", "--epochs", "1", "--pca-dim", "8", "--crop", "16", "--batch-size", "12",
              "--checkpoint-steps", "0", "--kmeans-backend", "torch"]


def _write_awkward_but_valid(folder: Path, rng: np.random.Generator) -> None:
    """CMYK JPEGs and 16-bit PNGs: both decoders turn them into RGB uint8, so they belong in a working run."""
    for i in range(4):
        rgb = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(rgb).convert("CMYK").save(folder / f"cmyk_{i}.jpg", quality=95)
        Image.fromarray(rng.integers(0, 65536, (20, 20), dtype=np.uint16)).save(folder / f"grey16_{i}.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = make_image_folder(tmp_path_factory.mktemp("data"), per_class=8)
    _write_awkward_but_valid(root / "square", np.random.default_rng(5))
    return root


@pytest.fixture(scope="module")
def earlier_run(data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("earlier_run")
    assert pydc.train.main(["--data", str(data), "--output", str(output), *BASE_FLAGS]) == 0
    return output


@pytest.fixture(scope="module")
def bad(tmp_path_factory, earlier_run) -> dict[str, Path]:
    """Every bad file and folder the rows refer to, made once."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(11)
    paths = {name: root / name for name in ("empty", "junk", "tiny", "truncated_jpegs", "loop", "huge", "few")}
    for folder in paths.values():
        folder.mkdir()
    for i in range(20):
        (paths["junk"] / f"text_{i:02d}.jpg").write_text("this is a text file\n")
    for i in range(10):
        (paths["junk"] / f"zero_{i:02d}.png").write_bytes(b"")
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)).save(paths["tiny"] / f"{i}.png")
        jpeg = paths["truncated_jpegs"] / f"{i}.jpg"  # the header survives, half the pixel data does not
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=90)
        jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    (paths["loop"] / "a.jpg").symlink_to("b.jpg")
    (paths["loop"] / "b.jpg").symlink_to("a.jpg")
    (paths["huge"] / "bomb.png").write_bytes(_png_header_only(30000, 30000))
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(paths["few"] / f"{i}.png")
    paths["a_file"] = root / "notes.txt"
    paths["a_file"].write_text("not a folder\n")

    checkpoint = earlier_run / "checkpoint.pt"
    paths["garbage.pt"] = root / "garbage.pt"
    paths["garbage.pt"].write_bytes(bytes(rng.integers(0, 256, 4096, dtype=np.uint8)))
    paths["truncated.pt"] = root / "truncated.pt"
    paths["truncated.pt"].write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    paths["newer.pt"] = root / "newer.pt"
    state = torch.load(checkpoint, weights_only=True)
    torch.save({**state, "format_version": FORMAT_VERSION + 1}, paths["newer.pt"])
    paths["not_pydc.pt"] = root / "not_pydc.pt"
    torch.save({"weights": torch.zeros(3)}, paths["not_pydc.pt"])
    # An earlier run whose checkpoint.pt was cut short (for --resume auto).
    paths["torn_run"] = root / "torn_run"
    shutil.copytree(earlier_run, paths["torn_run"])
    shutil.copyfile(paths["truncated.pt"], paths["torn_run"] / "checkpoint.pt")

    configs = {"bad.json": '{"epochs": 2,', "bad.yaml": "epochs: [1, 2\n", "negative.json": '{"epochs": -1}',
               "unknown.json": '{"epochz": 1}', "nan.json": '{"lr": NaN}', "arch.yaml": "arch: lenet\n",
               "string_bool.json": '{"tensorboard": "yes"}', "list.json": '{"k": [3]}', "text_int.yaml": "k: ten\n",
               "not_mapping.yaml": "- 1\n- 2\n", "inf.yaml": "wd: .inf\n", "backend.yaml": "data-backend: magic\n"}
    for name, text in configs.items():
        paths[name] = root / name
        paths[name].write_text(text)
    return paths


def _png_header_only(width: int, height: int) -> bytes:
    from tests.test_data_bad_files import _png_header_only as header_only

    return header_only(width, height)


def _unwritable_folder(tmp: Path) -> Path | None:
    if os.geteuid() != 0:
        folder = tmp / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder / "run"
    if not os.access("/proc/sys", os.W_OK):  # root: a read-only mount is the one place it cannot write
        return Path("/proc/sys/pydc-run")
    return None


# (id, flags, pattern the error line must match, stage). {name} refers to bad[name]; {run} to the earlier run;
# {data} to the good data folder. stage "options": refused by parse_args, before train() starts.
ROWS = [
    ("unknown flag", ["--bogus", "1"], r"unrecognized arguments: --bogus", "options"),
    ("arch unknown", ["--arch", "lenet"], r"--arch: invalid choice: 'lenet'", "options"),
    ("algo unknown", ["--algo", "magic"], r"--algo: invalid choice: 'magic'", "options"),
    ("k 0", ["--k", "0"], r"--k: expected an integer >= 1, got 0", "options"),
    ("k -5", ["--k", "-5"], r"--k: expected an integer >= 1, got -5", "options"),
    ("k 2.5", ["--k", "2.5"], r"--k: invalid int value: '2.5'", "options"),
    ("epochs -1", ["--epochs", "-1"], r"--epochs: expected an integer >= 1, got -1", "options"),
    ("batch-size 0", ["--batch-size", "0"], r"--batch-size: expected an integer >= 1, got 0", "options"),
    ("lr nan", ["--lr", "nan"], r"--lr: expected a finite number, got nan", "options"),
    ("lr 1e12", ["--lr", "1e12"], r"--lr: expected a number in \(0, 10\]", "options"),
    ("lr 0", ["--lr", "0"], r"--lr: expected a number in \(0, 10\], got 0.0", "options"),
    ("lr -inf", ["--lr=-inf"], r"--lr: expected a finite number", "options"),
    ("pca-dim 0", ["--pca-dim", "0"], r"--pca-dim: expected an integer >= 1, got 0", "options"),
    ("crop 0", ["--crop", "0"], r"--crop: expected an integer >= 1, got 0", "options"),
    ("crop 4 for small", ["--crop", "4"], r"--crop 4: small expects crops of at least 8x8", "options"),
    ("crop 32 for alexnet", ["--arch", "alexnet", "--crop", "32"], r"--crop 32: alexnet expects 224x224", "options"),
    ("crop-scale 1.5", ["--crop-scale", "1.5"], r"--crop-scale: expected a number in \(0, 1\], got 1.5", "options"),
    ("crop-scale 0", ["--crop-scale", "0"], r"--crop-scale: expected a number in \(0, 1\]", "options"),
    ("odc-momentum 2", ["--algo", "odc", "--odc-momentum", "2"], r"--odc-momentum: expected a number in \[0, 1\]",
     "options"),
    ("odc-dropout 1", ["--algo", "odc", "--odc-dropout", "1"], r"--odc-dropout: expected a number in \[0, 1\)",
     "options"),
    ("odc-centroid-interval 0", ["--odc-centroid-interval", "0"], r"--odc-centroid-interval: expected an integer >= 1",
     "options"),
    ("kmeans-iters 0", ["--kmeans-iters", "0"], r"--kmeans-iters: expected an integer >= 1", "options"),
    ("momentum 1.5", ["--momentum", "1.5"], r"--momentum: expected a number in \[0, 1\)", "options"),
    ("wd -1", ["--wd", "-1"], r"--wd: expected a number in \[0, 1\]", "options"),
    ("seed -1", ["--seed", "-1"], r"--seed: expected an integer in \[0, 2147483647\]", "options"),
    ("checkpoint-steps -1", ["--checkpoint-steps", "-1"], r"--checkpoint-steps: expected an integer >= 0", "options"),
    ("keep-checkpoints -1", ["--keep-checkpoints", "-1"], r"--keep-checkpoints: expected an integer >= 0", "options"),
    ("device tpu:9", ["--device", "tpu:9"], r"--device: expected cpu, cuda or cuda:N, got 'tpu:9'", "options"),
    ("device junk", ["--device", "junk"], r"--device: expected cpu, cuda or cuda:N, got 'junk'", "options"),
    pytest.param(("device cuda without a GPU", ["--device", "cuda"], r"--device cuda: asks for a GPU but torch sees "
                  r"none", "options"), marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
    ("threads -2", ["--threads", "-2"], r"--threads: expected an integer in \[0, 1024\], got -2", "options"),
    ("workers -1", ["--workers", "-1"], r"--workers: expected an integer in \[1, 1024\], got -1", "options"),
    ("workers 0", ["--workers", "0"], r"--workers: expected an integer in \[1, 1024\], got 0", "options"),
    ("data-backend magic", ["--data-backend", "magic"], r"--data-backend: invalid choice: 'magic'", "options"),
    ("kmeans-backend magic", ["--kmeans-backend", "magic"], r"--kmeans-backend: invalid choice: 'magic'", "options"),
    ("output is a file", ["--output", "{a_file}"], r"--output .*notes.txt: names an existing file", "options"),
    ("output below a file", ["--output", "{a_file}/run"], r"--output .*: .*notes.txt is not a folder", "options"),
    ("output without write permission", ["--output", "{unwritable}"], r"--output .*: no permission to write in",
     "options"),
    ("data missing", ["--data", "{a_file}.missing"], r"--data .*notes.txt.missing: no such folder", "options"),
    ("data is a file", ["--data", "{a_file}"], r"--data .*notes.txt: is a file; expected a folder", "options"),
    ("resume missing", ["--resume", "{a_file}.pt"], r"--resume .*notes.txt.pt: no such file", "options"),
    ("resume is a folder", ["--resume", "{empty}"], r"--resume .*empty: is a folder; expected a checkpoint file",
     "options"),
    ("resume garbage", ["--resume", "{garbage.pt}"], r"--resume .*garbage.pt: .*cannot be read", "options"),
    ("resume truncated", ["--resume", "{truncated.pt}"], r"--resume .*truncated.pt: .*cannot be read.*truncated",
     "options"),
    ("resume auto, torn checkpoint", ["--resume", "auto", "--output", "{torn_run}"],
     r"--resume auto: checkpoint .*torn_run/checkpoint.pt cannot be read", "options"),
    ("resume newer format", ["--resume", "{newer.pt}"],
     rf"--resume .*newer.pt: .*format version {FORMAT_VERSION + 1}, newer than this pydc reads", "options"),
    ("resume not a pydc checkpoint", ["--resume", "{not_pydc.pt}"], r"is a torch file but not a pydc.train checkpoint",
     "options"),
    ("resume other arch", ["--resume", "{run}/checkpoint.pt", "--arch", "resnet50"],
     r"was written with --arch small, but this run has --arch resnet50", "options"),
    ("resume other k", ["--resume", "{run}/checkpoint.pt", "--k", "4"],
     r"was written with --k 3, but this run has --k 4", "options"),
    ("resume other algo", ["--resume", "{run}/checkpoint.pt", "--algo", "odc"],
     r"was written with --algo deepcluster, but this run has --algo odc", "options"),
    ("config missing", ["--config", "{a_file}.json"], r"--config .*notes.txt.json: no such file", "options"),
    ("config bad JSON", ["--config", "{bad.json}"], r"--config .*bad.json: cannot be read as JSON", "options"),
    ("config bad YAML", ["--config", "{bad.yaml}"], r"--config .*bad.yaml: cannot be read as YAML", "options"),
    ("config not a mapping", ["--config", "{not_mapping.yaml}"], r"expected a mapping of option names", "options"),
    ("config negative epochs", ["--config", "{negative.json}"],
     r"--epochs: expected an integer >= 1, got -1 \(from --config .*negative.json\)", "options"),
    ("config unknown key", ["--config", "{unknown.json}"], r"--config .*unknown.json: unknown option 'epochz'",
     "options"),
    ("config NaN", ["--config", "{nan.json}"], r"--lr: expected a finite number, got nan \(from --config", "options"),
    ("config inf", ["--config", "{inf.yaml}"], r"--wd: expected a finite number, got inf \(from --config", "options"),
    ("config unknown arch", ["--config", "{arch.yaml}"], r"--arch: expected one of small.*got 'lenet' \(from --config",
     "options"),
    ("config backend magic", ["--config", "{backend.yaml}"], r"--data-backend: expected one of auto, dali, "
     r"torchvision, got 'magic'", "options"),
    ("config bool as text", ["--config", "{string_bool.json}"], r"--tensorboard: expected true or false, got 'yes'",
     "options"),
    ("config list for k", ["--config", "{list.json}"], r"--k: expected an integer, got \[3\]", "options"),
    ("config text for k", ["--config", "{text_int.yaml}"], r"--k: invalid int value: 'ten'", "options"),
    # Refused by the trainer once it lists the data folder (after the options, before any training).
    ("data empty folder", ["--data", "{empty}"], r"--data .*empty: no images found", "data"),
    ("data fewer images than k", ["--data", "{few}"], r"holds 2 images, fewer than --k 3 clusters", "data"),
    ("data all junk", ["--data", "{junk}"],
     r"no image decodes: of the files tried, all 30, 20 not an image \(e\.g\. .*text_00.jpg.*\); 10 empty file",
     "data"),
    ("data 1x1 images", ["--data", "{tiny}"], r"no image decodes: .* 12 too small \(e\.g\. ", "data"),
    ("data truncated JPEGs", ["--data", "{truncated_jpegs}"], r"no image decodes: .* 12 corrupt \(e\.g\. ", "data"),
    ("data symlink loop", ["--data", "{loop}"], r"no image decodes: .* 2 unreadable \(e\.g\. .*a.jpg", "data"),
    ("data decompression bomb", ["--data", "{huge}"], r"no image decodes: .* 1 too large", "data"),
]

ERROR_LINE = re.compile(r"^(python -m pydc\.train|pydc\.train): error: ", re.M)


def _snapshot(folder: Path) -> dict[str, tuple]:
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns,
                                            hashlib.sha256(path.read_bytes()).hexdigest())
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _argv(flags: list[str], bad: dict, run: Path, data: Path, unwritable: Path | None) -> list[str]:
    names = {**{key: str(value) for key, value in bad.items()}, "run": str(run), "data": str(data),
             "unwritable": str(unwritable)}
    resolved = [re.sub(r"\{([^}]+)\}", lambda match: names[match.group(1)], flag) for flag in flags]
    return ["--data", str(data), "--output", str(run), *(RUN_FLAGS if "--config" in flags else BASE_FLAGS), *resolved]


def _run_in_process(argv: list[str]) -> int:
    try:
        return pydc.train.main(argv)
    except SystemExit as exit_info:  # parse errors
        return exit_info.code


def _check_refusal(status, stderr: str, pattern: str) -> None:
    assert status == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = ERROR_LINE.findall(stderr)
    assert len(errors) == 1, stderr
    error_line = stderr[stderr.index("error: "):].splitlines()[0]
    assert re.search(pattern, error_line), error_line


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row[0] if isinstance(row, tuple) else None)
def test_bad_input_is_refused_with_one_message(row, bad, earlier_run, data, tmp_path, capsys):
    name, flags, pattern, stage = row
    unwritable = _unwritable_folder(tmp_path)
    if "{unwritable}" in flags and unwritable is None:
        pytest.skip("running as root with no read-only mount to write to")
    argv = _argv(flags, bad, earlier_run, data, unwritable)
    watched = [earlier_run, bad["torn_run"]]
    before = [_snapshot(folder) for folder in watched]
    status = _run_in_process(argv)
    _check_refusal(status, capsys.readouterr().err, pattern)
    assert [_snapshot(folder) for folder in watched] == before
    if stage == "options" and "--output" not in flags:  # nothing is created either
        fresh = tmp_path / "fresh_run"
        assert _run_in_process([*argv, "--output", str(fresh)]) == 2
        capsys.readouterr()
        assert not fresh.exists()


def test_fewer_decodable_images_than_k(bad, earlier_run, data, tmp_path, capsys):
    folder = tmp_path / "mostly_junk"
    shutil.copytree(bad["junk"], folder)
    for i in range(2):
        shutil.copyfile(bad["few"] / f"{i}.png", folder / f"good_{i}.png")
    status = _run_in_process(["--data", str(folder), "--output", str(tmp_path / "run"), *BASE_FLAGS])
    _check_refusal(status, capsys.readouterr().err, r"2 images decoded, fewer than --k 3 clusters; skipped: ")


@pytest.mark.parametrize("row_id", ["crop 0", "data all junk", "resume truncated"])
def test_bad_input_in_a_real_process(row_id, bad, earlier_run, data):
    """The same refusals from `python -m pydc.train` itself: status 2 and no traceback on stderr."""
    _, flags, pattern, _ = next(row for row in ROWS if isinstance(row, tuple) and row[0] == row_id)
    argv = _argv(flags, bad, earlier_run, data, None)
    before = _snapshot(earlier_run)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "pydc.train", *argv], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    _check_refusal(result.returncode, result.stderr, pattern)
    assert result.stdout == ""
    assert _snapshot(earlier_run) == before


def test_enough_rows():
    assert len(ROWS) >= 45


def test_earlier_run_trained_on_cmyk_and_16_bit_files(earlier_run, data):
    """CMYK JPEGs and 16-bit PNGs are not bad input: the earlier run used them, and both backends decode them."""
    final = [json.loads(line) for line in (earlier_run / "log.jsonl").read_text().splitlines()][-1]
    assert final["event"] == "final" and final["images"] == len(ImageFolderIndex(data))
    index = ImageFolderIndex(data, use_cache=False)
    for backend in ["torchvision"] + (["dali"] if dali_available() else []):
        loader = FeatureLoader(index, 16, 8, backend=backend, cache_in_memory=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            images = torch.cat([batch.images for batch in loader])
        assert not [w for w in caught if "pydc.data: skipping" in str(w.message)]
        assert loader.stats["skipped"] == 0 and images.shape[0] == len(index)
