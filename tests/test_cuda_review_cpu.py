"""What the CUDA-kernel review (issue 13) changed, pinned on the CPU: the semantics the CUDA kernels now share
with the CPU kernels (NaN never wins the ODC argmax, out-of-range labels refused with no change), the Python
side of the device status flags (decoding, lazy tallies), the lazy NaN/Inf count of PCAWhitening, the
version counter the CUDA centroid-norm cache relies on, and setup.py's CUDA detection. Their CUDA twins are
in test_cuda_review.py."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

import pydc  # noqa: F401  (registers torch.ops.pydc)
from pydc.cluster import PCAWhitening
from pydc.ops import kmeans_assign, odc
from tests.test_odc_ops import clone_all, make_memory

UPDATE = torch.ops.pydc.odc_update_samples
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ ODC kernels
def test_cpu_update_refuses_bad_label_and_changes_nothing():
    memory = make_memory(40, 8, 5, generator=torch.Generator().manual_seed(0))
    memory[1][7] = 5  # label K: not a class
    before = clone_all(memory)
    indices = torch.tensor([3, 7, 9])
    with pytest.raises(RuntimeError, match=r"label_bank\[7\] = 5 is not a class in \[0, 5\)"):
        UPDATE(*memory, indices, torch.randn(3, 8), 0.5)
    for got, expected in zip(memory, before):
        assert torch.equal(got, expected)


def test_cpu_class_sums_refuses_bad_label():
    bank, labels, counts, sums, _ = make_memory(30, 4, 3, generator=torch.Generator().manual_seed(0))
    labels[11] = -1
    with pytest.raises(RuntimeError, match=r"label_bank\[11\] = -1 is not a class in \[0, 3\)"):
        torch.ops.pydc.odc_class_sums(bank, labels, sums, counts)


def test_nan_similarity_never_wins_on_cpu_and_in_the_reference():
    """Classes 0..39 have NaN centroids: their GEMM values are NaN and must lose to every real value (the CUDA
    kernel's lanes start on such values; before the fix a lane whose first value was NaN ignored the rest)."""
    generator = torch.Generator().manual_seed(2)
    memory = make_memory(200, 16, 100, torch.float64, generator=generator)
    memory[4][:40] = float("nan")
    reference = clone_all(memory)
    indices = torch.randint(0, 200, (64,), generator=generator)
    features = torch.randn(64, 16, dtype=torch.float64, generator=generator)
    changes = UPDATE(*memory, indices, features, 0.5)
    expected_changes = odc.odc_update_samples_reference(*reference, indices, features, 0.5)
    assert int(changes) == int(expected_changes)
    assert torch.equal(memory[1], reference[1])
    assert int(memory[1][indices].min()) >= 40  # no NaN class was chosen


def test_all_nan_row_gets_class_zero():
    memory = make_memory(10, 4, 6, torch.float64, generator=torch.Generator().manual_seed(3))
    memory[1][2] = 5
    memory[4][:] = float("nan")
    UPDATE(*memory, torch.tensor([2]), torch.randn(1, 4, dtype=torch.float64), 0.5)
    assert int(memory[1][2]) == 0


# --------------------------------------------------------------------------------------- device status flags
@pytest.mark.parametrize(("code", "error"), [(-1, IndexError), (-2, ValueError), (-3, IndexError),
                                             (-4, RuntimeError)])
def test_refused_batch_codes_raise(code, error):
    with pytest.raises(error):
        odc.raise_if_refused(torch.tensor(code), 100, 10)


def test_accepted_count_passes_through():
    assert odc.raise_if_refused(torch.tensor(7), 100, 10) == 7


def test_wrapper_raises_for_a_refused_batch_unless_asked_not_to(monkeypatch):
    memory = make_memory(20, 4, 3, generator=torch.Generator().manual_seed(0))
    refused = lambda *args: torch.tensor(-odc.LABEL_OUT_OF_RANGE)  # noqa: E731  (what the CUDA kernels return)
    monkeypatch.setattr(torch.ops.pydc, "odc_update_samples", refused)
    batch = (torch.tensor([1, 2]), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"label outside \[0, 3\)"):
        odc.odc_update_samples(*memory, *batch)
    assert int(odc.odc_update_samples(*memory, *batch, check=False)) == -odc.LABEL_OUT_OF_RANGE


def test_change_tally_sums_on_the_device_and_raises_once_when_read():
    tally = odc.ChangeTally(bank_length=100, num_classes=10)
    for changes in (3, -odc.INDEX_OUT_OF_RANGE, 4):
        tally.add(torch.tensor(changes), rows=8)
    with pytest.raises(IndexError, match=r"\[0, 100\)"):
        tally.total()
    assert tally.total() == 7  # the refused batch is reported once; accepted ones still count
    assert tally.ratio() == pytest.approx(7 / 24)
    tally.reset()
    assert tally.total() == 0 and tally.ratio() == 0.0


def test_centroids_version_moves_on_python_writes_but_not_by_a_custom_op():
    """The CUDA kernel caches the largest centroid norm per (tensor, version). Writes through torch move the
    version; a custom op's in-place write does not by itself (here, on the CPU), which is why
    odc_centroids_from_sums_cuda bumps it (test_cuda_review.py checks that)."""
    _, _, counts, sums, centroids = make_memory(20, 4, 3, generator=torch.Generator().manual_seed(0))
    version = centroids._version
    centroids[1] = 0.0
    assert centroids._version > version
    version = centroids._version
    centroids.copy_(centroids * 2)
    assert centroids._version > version
    version = centroids._version
    torch.ops.pydc.odc_centroids_from_sums(sums, counts, centroids, 20)
    assert centroids._version == version


# ------------------------------------------------------------------------------------------- PCA NaN/Inf count
def dirty_rows(rows=200, dim=6, bad=(3, 50, 51)):
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(0))
    x[list(bad), 2] = float("nan")
    return x


def test_deferred_nonfinite_check_raises_when_the_fit_is_needed():
    whitening = PCAWhitening(3, defer_nonfinite_check=True)
    whitening.partial_fit(dirty_rows())  # no host read of the count: nothing raised yet
    whitening.partial_fit(torch.randn(100, 6))
    assert whitening.n_samples_seen_ == 297  # exact whenever read
    with pytest.raises(ValueError, match="3 of 300 rows"):
        whitening.transform(torch.randn(4, 6))
    assert whitening.transform(torch.randn(4, 6)).shape == (4, 3)  # reported once, the finite rows kept
    assert whitening.n_samples_seen_ == 297


def test_deferred_check_in_fit_reports_at_the_end():
    with pytest.raises(ValueError, match="3 of 200 rows of x"):
        PCAWhitening(3, defer_nonfinite_check=True, fit_batch_rows=64).fit(dirty_rows())


def test_eager_check_is_the_cpu_default():
    with pytest.raises(ValueError, match="3 of 200 rows of the batch"):
        PCAWhitening(3).partial_fit(dirty_rows())


def test_deferred_and_eager_fits_agree():
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(1))
    deferred = PCAWhitening(3, defer_nonfinite_check=True)
    eager = PCAWhitening(3, defer_nonfinite_check=False)
    for batch in x.split(128):
        deferred.partial_fit(batch)
        eager.partial_fit(batch)
    torch.testing.assert_close(deferred.transform(x), eager.transform(x))
    assert deferred.state_dict()["n_samples_seen"] == 500


# ---------------------------------------------------------------------------------- k-means fp32 assignment
def near_tie_points(points=256, dim=64, classes=32, seed=0):
    """Points whose 32 centroid scores differ by ~1e-5 relative: TF32's ~1e-3 cannot rank them, float32 can."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(dim, generator=generator), dim=0)
    v = torch.randn(classes, dim, generator=generator)
    v -= (v @ u).unsqueeze(1) * u  # orthogonal to u: every centroid is equally far from u itself
    centroids = u + 0.05 * torch.nn.functional.normalize(v, dim=1)
    x = u + 1e-3 * torch.randn(points, dim, generator=generator)
    return x, centroids


def float64_labels(x, centroids):
    scores = (centroids.double() ** 2).sum(1) - 2.0 * x.double() @ centroids.double().T
    top2 = scores.topk(2, dim=1, largest=False)
    clear = (top2.values[:, 1] - top2.values[:, 0]) > 1e-6  # beyond float32's error at these magnitudes
    return top2.indices[:, 0], clear


def test_fp32_assignment_resolves_near_ties_on_cpu():
    """The data of the CUDA test of the fp32 path under the global TF32 flag: float32 ranks them exactly."""
    x, centroids = near_tie_points()
    expected, clear = float64_labels(x, centroids)
    assert clear.float().mean() > 0.8  # the test data do separate float32 from TF32
    labels, _ = kmeans_assign(x, centroids, allow_tf32=False)
    assert torch.equal(labels[clear], expected[clear])


# ---------------------------------------------------------------------------------------- setup.py detection
def locate_cuda_home():
    """setup.py's _locate_cuda_home, compiled alone (importing setup.py would run setup())."""
    source = (ROOT / "setup.py").read_text()
    tree = ast.parse(source)
    wanted = [node for node in tree.body if isinstance(node, ast.FunctionDef)
              and node.name in ("_locate_cuda_home", "_env_flag")]
    namespace = {"os": os, "Path": Path, "shutil": __import__("shutil")}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "setup.py", "exec"), namespace)  # noqa: S102
    return namespace["_locate_cuda_home"]


def fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    (root / "include" / "cuda_runtime.h").write_text("")
    return nvcc


def test_cuda_home_from_the_nvcc_on_path(tmp_path, monkeypatch):
    nvcc = fake_toolkit(tmp_path / "toolkit")
    linked = tmp_path / "bin"
    linked.mkdir()
    (linked / "nvcc").symlink_to(nvcc)  # a symlink on PATH leads to its toolkit
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(linked))
    assert locate_cuda_home()() == str(tmp_path / "toolkit")
    assert os.environ["CUDA_HOME"] == str(tmp_path / "toolkit")


def test_set_cuda_home_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", "/opt/somewhere")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert locate_cuda_home()() == "/opt/somewhere"


def test_force_cuda_without_a_toolkit_is_an_error(tmp_path, monkeypatch):
    wrapper = tmp_path / "nvcc"  # a wrapper script outside any toolkit is passed over
    wrapper.write_text("#!/bin/sh\n")
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(Path, "is_file", lambda self: str(self).startswith(str(tmp_path)) and os.path.isfile(self))
    monkeypatch.setenv("FORCE_CUDA", "1")
    with pytest.raises(SystemExit, match="FORCE_CUDA=1 but no CUDA toolkit"):
        locate_cuda_home()()
    monkeypatch.setenv("FORCE_CUDA", "0")
    assert locate_cuda_home()() is None
