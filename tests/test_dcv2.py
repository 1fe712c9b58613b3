"""DeepCluster-v2: clustering of the memory into prototypes, the loss, the memory update, exact resume, torchrun;
and the trainer's promise that it names no algorithm."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pydc.algorithms import ALGORITHMS
from pydc.algorithms.dcv2 import DeepClusterV2, mean_pairwise_cosine, prototype_loss
from pydc.cluster import kmeans
from pydc.data import Batch
from pydc.utils.options import parse_args
from tests.test_train import REPO, TINY_FLAGS, run_cli, tiny_data  # noqa: F401 (fixture)
from tests.test_train_resume import _assert_same_state, _global_step, kill_during_run

# A colour strength other than the `small` default (none) keeps the colour distortion in the whole-run tests.
DCV2_FLAGS = ["--algo", "dcv2", "--dcv2-small-crops", "2", "--dcv2-small-size", "8", "--dcv2-color-strength", "0.5",
              "--no-plots"]


def _algorithm(num_images=40, k=4, sets=3, seed=0):
    args = parse_args(["--algo", "dcv2", "--k", str(k), "--dcv2-prototypes", str(sets), "--device", "cpu",
                       "--seed", str(seed)])
    return DeepClusterV2(args, num_images, torch.device("cpu"))


def _fill(algorithm, seed=0):
    generator = torch.Generator().manual_seed(seed)
    algorithm.memory.copy_(F.normalize(torch.randn(algorithm.memory.shape, generator=generator), dim=2))
    algorithm.memory_filled = True


def test_spherical_kmeans_of_the_memory_gives_the_prototypes():
    algorithm = _algorithm()
    _fill(algorithm)
    algorithm.cluster_memory(epoch=3)
    args = algorithm.args
    for number in range(algorithm.num_sets):
        prototypes = algorithm.prototypes[number]
        torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(args.k), rtol=0, atol=1e-6)
        # Set j is the spherical k-means of large crop j mod 2's memory, with its own seed.
        expected = kmeans(algorithm.memory[number % 2], args.k, niter=args.dcv2_kmeans_iters,
                          seed=(args.seed * 1_000_003 + 3) * algorithm.num_sets + number, backend="torch",
                          spherical=True)
        torch.testing.assert_close(prototypes, expected.centroids, rtol=0, atol=1e-6)
        assert torch.equal(algorithm.labels[number], expected.labels)
    # Sets 0 and 1 cluster different crops' memories, so they differ.
    assert not torch.equal(algorithm.prototypes[0], algorithm.prototypes[1])


def test_assignments_cover_every_image_of_the_memory():
    algorithm = _algorithm(num_images=57, k=5)
    assert algorithm.assignments() is None  # nothing clustered before the memory is filled
    _fill(algorithm, seed=1)
    algorithm.cluster_memory(epoch=0)
    labels = algorithm.labels
    assert labels.shape == (3, 57) and labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) < 5  # no image left unassigned (-100)
    for number in range(3):
        nearest = (algorithm.memory[number % 2] @ algorithm.prototypes[number].t()).argmax(dim=1)
        assert torch.equal(labels[number], nearest)  # every image is assigned its nearest prototype
    assert torch.equal(algorithm.assignments(), labels[0])


def _reference_loss(embeddings, prototypes, targets, temperature):
    """Plain torch: -log softmax of the target, averaged over rows (every crop of every image), then over sets."""
    total = 0.0
    views = embeddings.shape[0] // targets.shape[1]
    for number in range(prototypes.shape[0]):
        scores = embeddings @ prototypes[number].t() / temperature
        log_probabilities = scores - torch.logsumexp(scores, dim=1, keepdim=True)
        rows = torch.arange(embeddings.shape[0])
        total = total - log_probabilities[rows, targets[number].repeat(views)].mean()
    return total / prototypes.shape[0]


class _FixedEmbeddings(torch.nn.Module):
    def __init__(self, embeddings):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, views):
        assert sum(view.shape[0] for view in views) == self.embeddings.shape[0]
        return self.embeddings


def test_loss_matches_plain_torch_and_the_step_writes_the_memory():
    algorithm = _algorithm(num_images=30, k=4)
    _fill(algorithm, seed=2)
    algorithm.cluster_memory(epoch=0)
    batch_size, views = 6, 4
    generator = torch.Generator().manual_seed(7)
    embeddings = F.normalize(torch.randn(views * batch_size, 128, generator=generator), dim=1)
    indices = torch.tensor([4, 17, 0, 29, 11, 8])
    crops = [torch.zeros(batch_size, 3, 8, 8, dtype=torch.uint8) for _ in range(views)]
    batch = Batch(images=crops[0], indices=indices, labels=None, views=crops)

    loss = algorithm.loss(_FixedEmbeddings(embeddings), batch)
    reference = _reference_loss(embeddings.double(), algorithm.prototypes.double(), algorithm.labels[:, indices], 0.1)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prototype_loss(embeddings, algorithm.prototypes, algorithm.labels[:, indices], 0.1),
                               loss)

    before = algorithm.memory.clone()
    algorithm.after_step(1)
    for crop in range(2):  # the two large crops' embeddings replace the batch's memory rows
        torch.testing.assert_close(algorithm.memory[crop, indices],
                                   embeddings[crop * batch_size:(crop + 1) * batch_size], rtol=0, atol=0)
    others = torch.ones(30, dtype=torch.bool)
    others[indices] = False
    assert torch.equal(algorithm.memory[:, others], before[:, others])


def test_a_repeated_image_keeps_its_first_embedding():
    algorithm = _algorithm(num_images=10, k=2)
    embeddings = torch.arange(2 * 3 * 128, dtype=torch.float32).view(6, 128)
    algorithm._write_memory(torch.tensor([5, 2, 5]), embeddings)
    assert torch.equal(algorithm.memory[0, 5], embeddings[0]) and torch.equal(algorithm.memory[1, 5], embeddings[3])
    assert torch.equal(algorithm.memory[0, 2], embeddings[1])


def test_trainer_names_no_algorithm():
    source = (REPO / "pydc" / "train.py").read_text()
    names = {name for name in ALGORITHMS} | {cls.__name__ for cls in ALGORITHMS.values()}
    pattern = re.compile("|".join([r"deep.?cluster", r"\bodc", r"dcv2", r"swav", *map(re.escape, names)]),
                         re.IGNORECASE)
    assert not pattern.findall(source), f"pydc/train.py names an algorithm: {sorted(set(pattern.findall(source)))}"


def test_color_strength_default_and_the_training_loader(tiny_data):  # noqa: F811
    """No colour distortion for `small` (the grey digits; README), SwAV's s = 1 for the other archs; a given
    strength reaches the training loader, and the other algorithms' loaders get none."""
    from pydc.data import ImageFolderIndex
    from pydc.train import build_loaders

    assert parse_args(["--algo", "dcv2", "--device", "cpu"]).dcv2_color_strength == 0.0
    assert parse_args(["--algo", "dcv2", "--arch", "resnet50", "--device", "cpu"]).dcv2_color_strength == 1.0
    index = ImageFolderIndex(tiny_data)
    for flags, strength in ((["--algo", "dcv2"], 0.0), (["--algo", "dcv2", "--dcv2-color-strength", "0.7"], 0.7),
                            (["--algo", "deepcluster", "--dcv2-color-strength", "0.7"], 0.0)):
        args = parse_args([*flags, "--device", "cpu", "--crop", "16", "--k", "3", "--workers", "1"])
        algorithm = ALGORITHMS[args.algo](args, len(index), torch.device("cpu"))
        _, train_loader = build_loaders(args, index, algorithm, 0, 1, torch.device("cpu"))
        assert train_loader.color_strength == strength and train_loader.color_distortion == (strength > 0)


# -- whole runs ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dcv2_run(tiny_data, tmp_path_factory):  # noqa: F811
    output = tmp_path_factory.mktemp("dcv2_run")
    run_cli("pydc.train", "--data", tiny_data, "--output", output, "--deterministic", "--checkpoint-steps", "1",
            *TINY_FLAGS, *DCV2_FLAGS)
    return output


def test_dcv2_run_logs_and_checkpoints(dcv2_run):
    import json

    records = [json.loads(line) for line in (dcv2_run / "log.jsonl").read_text().splitlines()]
    epochs = [record for record in records if "event" not in record]
    assert [record["epoch"] for record in epochs] == [0, 1]
    assert "time_features" in epochs[0] and "time_features" not in epochs[1]  # the memory is filled once
    assert all(np.isfinite(record["loss"]) and "time_kmeans" in record for record in epochs)
    final = records[-1]
    assert final["event"] == "final" and 0.0 <= final["knn_accuracy"] <= 1.0
    state = torch.load(dcv2_run / "checkpoint.pt", weights_only=True)
    assert state["format_version"] == 2 and state["args"]["stem"] == "rgb" and state["head_optimizer"] is None
    algorithm = state["algorithm"]
    assert algorithm["memory"].shape == (2, 72, 128) and algorithm["prototypes"].shape == (3, 3, 128)
    torch.testing.assert_close(algorithm["memory"].norm(dim=2), torch.ones(2, 72))
    assert torch.equal(state["assignments"], algorithm["assignments"][0])
    np.testing.assert_array_equal(np.load(dcv2_run / "assignments" / "epoch_001.npy"), state["assignments"].numpy())


def test_dcv2_sigkill_then_resume_is_exact(dcv2_run, tiny_data, tmp_path):  # noqa: F811
    total_steps = 12
    kill_after = random.Random(15).randint(1, total_steps - 3)  # seeded: the same kill step on every run
    flags = ["--data", tiny_data, "--output", tmp_path, "--deterministic", "--checkpoint-steps", "1", *TINY_FLAGS,
             *DCV2_FLAGS]
    checkpoint = tmp_path / "checkpoint.pt"
    kill_during_run(flags, checkpoint, kill_after)
    assert 0 < _global_step(checkpoint) < total_steps

    run_cli("pydc.train", *flags, "--resume", checkpoint)

    resumed = torch.load(checkpoint, weights_only=True)
    uninterrupted = torch.load(dcv2_run / "checkpoint.pt", weights_only=True)
    for key in ("model", "optimizer", "algorithm", "assignments", "previous_assignments", "epoch", "step",
                "global_step"):
        _assert_same_state(resumed[key], uninterrupted[key], key)


@pytest.mark.slow
def test_torchrun_two_ranks_dcv2_share_prototypes_and_assignments(tiny_data, tmp_path):  # noqa: F811
    from tests.test_train_distributed import _torchrun

    records = _torchrun(tmp_path, tiny_data, *DCV2_FLAGS, "--no-eval")
    # ranks_agree (asserted by _torchrun) compares the assignments and every tensor of the algorithm's state
    # (memory, prototypes, all prototype sets' assignments) with rank 0's.
    assert [r["epoch"] for r in records if "event" not in r] == [0, 1]
    state = torch.load(Path(tmp_path) / "checkpoint.pt", weights_only=True)
    assert state["algorithm"]["prototypes"].abs().sum() > 0


@pytest.mark.slow
def test_dcv2_defaults_learn_on_the_digits(tmp_path):
    """The failure this guards against (README, "DeepCluster-v2 on the digits"): with SwAV's colour distortion
    on the grey digits the embeddings collapsed in the first steps, the memory's rows crowding together
    (memory_cosine 0.36 -> 0.85-0.90) and the loss staying at chance, ln k, for every epoch. With the defaults
    the third epoch's memory stays spread (~0.6) and its loss lies well below chance (~ln k - 0.8)."""
    import math

    from tests.test_train import read_log

    run_cli("pydc.train", "--algo", "dcv2", "--output", tmp_path, "--epochs", "3", "--threads", "1", "--device",
            "cpu", "--no-plots", "--no-eval", "--checkpoint-steps", "0", timeout=1200)
    epochs = [record for record in read_log(tmp_path) if "event" not in record]
    k = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["args"]["k"]
    assert [record["epoch"] for record in epochs] == [0, 1, 2]
    assert epochs[-1]["memory_cosine"] < 0.75, [record["memory_cosine"] for record in epochs]
    assert epochs[-1]["loss"] < math.log(k) - 0.3, ([record["loss"] for record in epochs], math.log(k))


def test_memory_cosine_is_the_mean_over_pairs_of_distinct_rows():
    """The collapse watch of the epoch record: equals the brute-force mean of the off-diagonal cosines, is 1 for a
    collapsed memory and -1 / (N - 1) for rows summing to zero."""
    generator = torch.Generator().manual_seed(4)
    rows = F.normalize(torch.randn(37, 16, generator=generator), dim=1)
    cosines = rows @ rows.t()
    brute_force = (cosines.sum() - cosines.diagonal().sum()) / (37 * 36)
    assert mean_pairwise_cosine(rows) == pytest.approx(float(brute_force), abs=1e-6)
    collapsed = F.normalize(torch.ones(9, 16), dim=1)
    assert mean_pairwise_cosine(collapsed) == pytest.approx(1.0, abs=1e-6)
    opposite = torch.cat([torch.eye(4), -torch.eye(4)])  # sum is zero: mean = -N / (N (N - 1))
    assert mean_pairwise_cosine(opposite) == pytest.approx(-1.0 / 7.0, abs=1e-6)
