"""ODC memory ops: kernels against the pure-torch references, duplicate indices, ties, opcheck, bad input."""

from __future__ import annotations

import pytest
import torch

import pydc  # noqa: F401  (registers torch.ops.pydc)
from pydc.ops import odc
from tests.conftest import cpu_and_cuda

UPDATE = torch.ops.pydc.odc_update_samples
CLASS_SUMS = torch.ops.pydc.odc_class_sums
CENTROIDS = torch.ops.pydc.odc_centroids_from_sums

# The bank is rounded once from float64 math on every path; the float64 reductions may differ in order
# between kernel and reference, which can flip the last bit of a rounded value.
BANK_TOLERANCE = {torch.float32: dict(rtol=0, atol=2e-7), torch.float64: dict(rtol=0, atol=1e-15)}


def make_memory(length, dim, classes, dtype=torch.float32, device="cpu", generator=None):
    """A random memory in a consistent state: normalized rows, labels, exact counts and sums, centroids."""
    bank = torch.randn(length, dim, dtype=torch.float64, generator=generator)
    bank = torch.nn.functional.normalize(bank, dim=1)
    bank = bank.to(device=device, dtype=dtype)
    labels = torch.randint(0, classes, (length,), generator=generator).to(device)
    counts = torch.zeros(classes, dtype=torch.int64, device=device)
    sums = torch.zeros(classes, dim, dtype=torch.int64, device=device)
    odc.odc_class_sums_reference(bank, labels, sums, counts)
    centroids = torch.randn(classes, dim, dtype=torch.float64, generator=generator)
    centroids = centroids.to(device=device, dtype=dtype)
    return [bank, labels, counts, sums, centroids]


def clone_all(tensors):
    return [t.clone() for t in tensors]


def assert_same_memory(got, expected, dtype):
    bank, labels, counts, sums, centroids = got
    torch.testing.assert_close(bank, expected[0], **BANK_TOLERANCE[dtype])
    assert torch.equal(labels, expected[1])
    assert torch.equal(counts, expected[2])
    assert torch.equal(centroids, expected[4])
    # The maintained sums are exactly the fixed-point sums of the bank as it now is.
    fresh_sums, fresh_counts = torch.zeros_like(sums), torch.zeros_like(counts)
    odc.odc_class_sums_reference(bank, labels, fresh_sums, fresh_counts)
    assert torch.equal(sums, fresh_sums)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(300, 16, 7, 64), (50, 33, 3, 200), (1000, 128, 50, 256), (5, 4, 1, 9)],
                         ids=lambda s: "N{}xD{}xK{}xB{}".format(*s))
def test_update_matches_reference(device, dtype, shape):
    length, dim, classes, batch = shape
    generator = torch.Generator().manual_seed(1)
    memory = make_memory(length, dim, classes, dtype, device, generator)
    expected = clone_all(memory)
    for _ in range(5):  # several steps: later ones start from relabelled rows; indices with replacement
        indices = torch.randint(0, length, (batch,), generator=generator).to(device)
        features = torch.randn(batch, dim, generator=generator).to(device=device, dtype=dtype)
        changes = UPDATE(*memory[:4], memory[4], indices, features, 0.5)
        expected_changes = odc.odc_update_samples_reference(*expected[:4], expected[4], indices, features,
                                                            0.5)
        assert changes.dtype == torch.int64 and changes.dim() == 0
        assert int(changes) == int(expected_changes)
        assert_same_memory(memory, expected, dtype)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_duplicates_apply_in_batch_order(device):
    generator = torch.Generator().manual_seed(2)
    memory = make_memory(20, 8, 4, torch.float64, device, generator)
    sequential = clone_all(memory)
    indices = torch.tensor([3, 7, 3, 3, 0, 7], device=device)
    features = torch.randn(6, 8, dtype=torch.float64, generator=generator).to(device)
    changes = int(UPDATE(*memory[:4], memory[4], indices, features, 0.3))
    one_by_one = sum(int(UPDATE(*sequential[:4], sequential[4], indices[j:j + 1], features[j:j + 1], 0.3))
                     for j in range(6))
    assert changes == one_by_one
    assert torch.equal(memory[0], sequential[0]) and torch.equal(memory[1], sequential[1])
    assert torch.equal(memory[2], sequential[2]) and torch.equal(memory[3], sequential[3])
    # The order matters: the reversed batch gives a different row 3 (so the test can tell orders apart).
    reversed_memory = make_memory(20, 8, 4, torch.float64, device, torch.Generator().manual_seed(2))
    UPDATE(*reversed_memory[:4], reversed_memory[4], indices.flip(0), features.flip(0), 0.3)
    assert not torch.allclose(reversed_memory[0][3], memory[0][3])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_update_math_of_one_row(device):
    bank, labels, counts, sums, centroids = make_memory(10, 5, 3, torch.float64, device)
    old = bank[4].clone()
    feature = torch.randn(1, 5, dtype=torch.float64, device=device) * 7.0
    UPDATE(bank, labels, counts, sums, centroids, torch.tensor([4], device=device), feature, 0.25)
    f = feature[0] / (feature[0].norm() + 1e-10)
    v = 0.75 * old + 0.25 * f
    torch.testing.assert_close(bank[4], v / (v.norm() + 1e-10), rtol=0, atol=1e-15)
    assert int(labels[4]) == int(torch.argmax(centroids @ bank[4]))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_ties_go_to_lowest_class(device):
    bank, labels, counts, sums, _ = make_memory(6, 4, 4, torch.float32, device)
    direction = torch.tensor([[0.6, 0.8, 0.0, 0.0]], device=device)
    centroids = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.6, 0.8, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0],
                              [0.6, 0.8, 0.0, 0.0]], device=device)
    UPDATE(bank, labels, counts, sums, centroids, torch.tensor([2], device=device), direction, 1.0)
    assert int(labels[2]) == 1


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_near_ties_are_settled_exactly(device):
    # Centroids one float32 ulp apart in one coordinate: the float32 GEMM cannot order them reliably; the
    # label must still be the argmax of the exact dot products.
    generator = torch.Generator().manual_seed(3)
    dim, classes, batch = 64, 40, 200
    base = torch.nn.functional.normalize(torch.randn(1, dim, generator=generator), dim=1)
    centroids = base.repeat(classes, 1)
    for k in range(classes):
        centroids[k, k % dim] = torch.nextafter(centroids[k, k % dim], torch.tensor(2.0 if k % 2 else -2.0))
    centroids = centroids.to(device)
    bank, labels, counts, sums, _ = make_memory(batch, dim, classes, torch.float32, device, generator)
    features = (base + 1e-3 * torch.randn(batch, dim, generator=generator)).to(device)
    UPDATE(bank, labels, counts, sums, centroids, torch.arange(batch, device=device), features, 1.0)
    exact = torch.argmax(bank.double() @ centroids.double().t(), dim=1)
    assert torch.equal(labels, exact)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_maintained_sums_equal_full_recompute(device):
    generator = torch.Generator().manual_seed(4)
    bank, labels, counts, sums, centroids = make_memory(400, 24, 9, torch.float32, device, generator)
    for _ in range(30):
        indices = torch.randint(0, 400, (48,), generator=generator).to(device)
        UPDATE(bank, labels, counts, sums, centroids, indices, torch.randn(48, 24, device=device), 0.5)
    fresh_sums, fresh_counts = torch.full_like(sums, 7), torch.full_like(counts, 7)  # poisoned
    CLASS_SUMS(bank, labels, fresh_sums, fresh_counts)
    assert torch.equal(fresh_counts, torch.bincount(labels, minlength=9))
    assert torch.equal(fresh_counts, counts)
    assert torch.equal(fresh_sums, sums)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_class_sums_and_centroids_match_reference_and_mean(device, dtype):
    generator = torch.Generator().manual_seed(5)
    bank, labels, counts, sums, centroids = make_memory(700, 40, 12, dtype, device, generator)
    labels[labels == 3] = 4  # class 3 is empty: it keeps its centroid
    CLASS_SUMS(bank, labels, sums, counts)
    expected_sums, expected_counts = torch.zeros_like(sums), torch.zeros_like(counts)
    odc.odc_class_sums_reference(bank, labels, expected_sums, expected_counts)
    assert torch.equal(sums, expected_sums) and torch.equal(counts, expected_counts)
    old = centroids.clone()
    CENTROIDS(sums, counts, centroids, 700)
    expected = old.clone()
    odc.odc_centroids_from_sums_reference(sums, counts, expected, 700)
    assert torch.equal(centroids, expected)
    assert torch.equal(centroids[3], old[3])
    for k in (0, 4, 11):
        mean = bank[labels == k].double().mean(dim=0).to(dtype)
        torch.testing.assert_close(centroids[k], mean, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-7)


def test_centroids_do_not_depend_on_thread_count():
    generator = torch.Generator().manual_seed(6)
    bank, labels, counts, sums, centroids = make_memory(3000, 64, 30, torch.float32, "cpu", generator)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            s, c, cent = torch.zeros_like(sums), torch.zeros_like(counts), centroids.clone()
            CLASS_SUMS(bank, labels, s, c)
            CENTROIDS(s, c, cent, 3000)
            results.append(cent)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_empty_batch_changes_nothing(device):
    memory = make_memory(10, 4, 3, torch.float32, device)
    before = clone_all(memory)
    changes = UPDATE(*memory[:4], memory[4], torch.empty(0, dtype=torch.int64, device=device),
                     torch.empty(0, 4, device=device), 0.5)
    assert int(changes) == 0
    assert all(torch.equal(a, b) for a, b in zip(memory, before))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck(device):
    memory = make_memory(30, 8, 5, torch.float32, device)
    indices = torch.tensor([1, 5, 1, 29], device=device)
    features = torch.randn(4, 8, device=device)
    torch.library.opcheck(UPDATE, (*memory[:4], memory[4], indices, features, 0.5))
    bank, labels, counts, sums, centroids = make_memory(30, 8, 5, torch.float32, device)
    torch.library.opcheck(CLASS_SUMS, (bank, labels, sums, counts))
    torch.library.opcheck(CENTROIDS, (sums, counts, centroids, 30))


def test_wrappers_match_ops():
    memory = make_memory(40, 6, 4, torch.float32)
    copy = clone_all(memory)
    indices, features = torch.tensor([0, 39, 0]), torch.randn(3, 6)
    assert int(odc.odc_update_samples(*memory[:4], memory[4], indices, features, 0.5)) == int(
        UPDATE(*copy[:4], copy[4], indices, features, 0.5))
    assert all(torch.equal(a, b) for a, b in zip(memory, copy))


def bad_update_cases():
    def case(message, **changes):
        def build():
            bank, labels, counts, sums, centroids = make_memory(10, 4, 3)
            args = dict(feature_bank=bank, label_bank=labels, counts=counts, class_sums=sums,
                        centroids=centroids,
                        indices=torch.tensor([1, 2]), features=torch.randn(2, 4), momentum=0.5)
            for name, make in changes.items():
                args[name] = make(args)
            return args
        return pytest.param(build, message, id=message[:30])

    return [
        case("feature_bank of dtype float32 or float64", feature_bank=lambda a: a["feature_bank"].half()),
        case("label_bank of dtype int64|of dtype Long", label_bank=lambda a: a["label_bank"].int()),
        case("centroids of the feature_bank's dtype", centroids=lambda a: a["centroids"].double()),
        case("centroids of shape", centroids=lambda a: torch.randn(3, 5)),
        case("counts of", counts=lambda a: torch.zeros(4, dtype=torch.int64)),
        case("class_sums of", class_sums=lambda a: torch.zeros(3, 4, dtype=torch.int32)),
        case("features of shape", features=lambda a: torch.randn(3, 4)),
        case("indices", indices=lambda a: torch.tensor([1.0, 2.0])),
        case("momentum in \\[0, 1\\]", momentum=lambda a: 1.5),
        case("contiguous feature_bank", feature_bank=lambda a: torch.randn(4, 10).t()),
    ]


@pytest.mark.parametrize("build,message", bad_update_cases())
def test_bad_update_input(build, message):
    args = build()
    with pytest.raises(ValueError, match=message):
        odc.odc_update_samples(**args)
    with pytest.raises(RuntimeError, match=message):
        UPDATE(*args.values())


def test_index_outside_memory_is_refused_before_any_change():
    memory = make_memory(10, 4, 3)
    before = clone_all(memory)
    with pytest.raises(RuntimeError, match="outside the memory of 10 rows"):
        UPDATE(*memory[:4], memory[4], torch.tensor([2, 10]), torch.randn(2, 4), 0.5)
    assert all(torch.equal(a, b) for a, b in zip(memory, before))


def test_bad_class_sums_input():
    bank, labels, counts, sums, centroids = make_memory(10, 4, 3)
    with pytest.raises(ValueError, match="class_sums of dtype int64 and shape \\(3, 4\\)"):
        odc.odc_class_sums(bank, labels, sums[:, :2], counts)
    with pytest.raises(RuntimeError, match="class_sums of shape \\(3, 4\\)"):
        CLASS_SUMS(bank, labels, sums[:, :2].contiguous(), counts)
    with pytest.raises(ValueError, match="float32 or float64 centroids"):
        odc.odc_centroids_from_sums(sums, counts, centroids.half(), 10)
    labels[0] = 3
    with pytest.raises(RuntimeError, match="not a class in \\[0, 3\\)"):
        CLASS_SUMS(bank, labels, sums, counts)


@pytest.mark.cuda
def test_cuda_equals_cpu_kernel():
    generator = torch.Generator().manual_seed(7)
    cpu = make_memory(2000, 64, 100, torch.float32, "cpu", generator)
    gpu = [t.cuda() for t in cpu]
    for _ in range(10):
        indices = torch.randint(0, 2000, (256,), generator=generator)
        features = torch.randn(256, 64, generator=generator)
        a = UPDATE(*cpu[:4], cpu[4], indices, features, 0.5)
        b = UPDATE(*gpu[:4], gpu[4], indices.cuda(), features.cuda(), 0.5)
        assert int(a) == int(b)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=0, atol=2e-7)
    assert torch.equal(gpu[1].cpu(), cpu[1]) and torch.equal(gpu[2].cpu(), cpu[2])
    CENTROIDS(cpu[3], cpu[2], cpu[4], 2000)
    CENTROIDS(gpu[3], gpu[2], gpu[4], 2000)
    torch.testing.assert_close(gpu[4].cpu(), cpu[4], rtol=0, atol=1e-7)


@pytest.mark.cuda
def test_cuda_class_sums_and_centroids_are_bitwise_cpu():
    # Integer sums do not depend on the order of the atomics: the same bank gives the same bits.
    generator = torch.Generator().manual_seed(8)
    bank, labels, counts, sums, centroids = make_memory(5000, 96, 70, torch.float32, "cpu", generator)
    gpu = [t.cuda() for t in (bank, labels, counts, sums, centroids)]
    CLASS_SUMS(bank, labels, sums, counts)
    CLASS_SUMS(gpu[0], gpu[1], gpu[3], gpu[2])
    assert torch.equal(gpu[3].cpu(), sums) and torch.equal(gpu[2].cpu(), counts)
    CENTROIDS(sums, counts, centroids, 5000)
    CENTROIDS(gpu[3], gpu[2], gpu[4], 5000)
    assert torch.equal(gpu[4].cpu(), centroids)
