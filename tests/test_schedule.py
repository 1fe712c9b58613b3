"""The learning-rate schedule (pydc.utils.schedule) and the data-dependent defaults of --k and --pca-dim."""

import math

import pytest

from pydc.utils.checkpoint import CheckpointError, check_compatible
from pydc.utils.options import (default_k, default_odc_min_cluster, default_pca_dim, parse_args,
                                resolve_data_defaults)
from pydc.utils.schedule import learning_rate


def test_constant_schedule_is_the_base_rate_throughout():
    assert {learning_rate(0.05, p, 10) for p in (0.0, 3.5, 9.99)} == {0.05}


def test_warmup_rises_linearly_from_zero_then_holds():
    rates = [learning_rate(1.0, p, 10, "constant", warmup_epochs=2) for p in (0.0, 0.5, 1.0, 1.5, 2.0, 7.0)]
    assert rates == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])


def test_cosine_decays_from_the_end_of_warmup_to_zero():
    base, epochs, warmup = 0.1, 12, 2
    assert learning_rate(base, warmup, epochs, "cosine", warmup) == pytest.approx(base)
    assert learning_rate(base, 7.0, epochs, "cosine", warmup) == pytest.approx(base / 2)  # half-way: cos(pi/2)
    assert learning_rate(base, epochs, epochs, "cosine", warmup) == pytest.approx(0.0, abs=1e-12)
    middle = [learning_rate(base, p, epochs, "cosine", warmup) for p in (3.0, 5.0, 9.0, 11.0)]
    assert middle == sorted(middle, reverse=True)
    assert middle[0] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 0.1)))


@pytest.mark.parametrize("bad", [dict(schedule="step"), dict(progress=-1.0), dict(epochs=0)])
def test_bad_schedule_arguments_are_refused(bad):
    arguments = dict(base=0.1, progress=1.0, epochs=5, schedule="cosine") | bad
    with pytest.raises(ValueError):
        learning_rate(**arguments)


def test_default_k_over_clusters_by_the_number_of_images():
    assert default_k(1797) == 56  # the digits: one cluster per ~32 images
    assert default_k(1_281_167) == 10_000  # ImageNet: DeepCluster's k
    assert default_k(100) == 10  # floor
    assert default_k(4) == 4  # never more clusters than images


def test_default_pca_dim_follows_the_feature_width():
    assert [default_pca_dim(d) for d in (64, 256, 2048, 4096)] == [32, 64, 256, 256]


def test_k_is_resolved_from_the_data_unless_given(tmp_path):
    args = parse_args(["--output", str(tmp_path / "a")])
    assert args.k is None and args.pca_dim == 64
    resolve_data_defaults(args, 3200)
    assert args.k == 100
    given = parse_args(["--output", str(tmp_path / "b"), "--k", "7", "--pca-dim", "16"])
    resolve_data_defaults(given, 3200)
    assert (given.k, given.pca_dim) == (7, 16)


def test_default_odc_min_cluster_keeps_mmselfsups_fraction_of_the_mean_cluster():
    assert default_odc_min_cluster(1_281_167, 10_000) == 20  # MMSelfSup's value on ImageNet
    assert default_odc_min_cluster(1797, default_k(1797)) == 5  # the digits: ~32 images per cluster
    assert default_odc_min_cluster(24, 3) == 1  # never 0: empty clusters are always refilled
    assert default_odc_min_cluster(5000, 10) == 78  # it follows N / k, not a constant


def test_odc_min_cluster_is_resolved_after_k_unless_given(tmp_path):
    args = parse_args(["--output", str(tmp_path / "a"), "--algo", "odc"])
    assert args.odc_min_cluster is None
    resolve_data_defaults(args, 1280)
    assert (args.k, args.odc_min_cluster) == (40, 5)
    given_k = parse_args(["--output", str(tmp_path / "b"), "--algo", "odc", "--k", "8"])
    resolve_data_defaults(given_k, 1280)
    assert given_k.odc_min_cluster == 25  # from the given k: 160 images per cluster
    given = parse_args(["--output", str(tmp_path / "c"), "--algo", "odc", "--odc-min-cluster", "3"])
    resolve_data_defaults(given, 1280)
    assert given.odc_min_cluster == 3


def test_defaults_chosen_on_the_quality_suite(tmp_path):
    """README "Defaults": cosine decay (constant-rate DeepCluster ends at a random point of a 0.07-0.13 NMI swing)
    and DeepCluster crops of at least 30% of the image (8% of a 32x32 image is 9x9 pixels)."""
    deepcluster = parse_args(["--output", str(tmp_path / "a")])
    assert (deepcluster.lr_schedule, deepcluster.crop_scale, deepcluster.epochs) == ("cosine", 0.3, 30)
    odc = parse_args(["--output", str(tmp_path / "b"), "--algo", "odc"])
    assert (odc.lr_schedule, odc.crop_scale) == ("cosine", 0.5)


def test_unresolved_k_is_checked_against_a_checkpoint_only_once_resolved():
    saved = {"algo": "deepcluster", "arch": "small", "k": 56, "crop": 32, "stem": "sobel"}
    check_compatible(saved, {**saved, "k": None}, "c.pt")  # options stage: k not known yet
    with pytest.raises(CheckpointError, match="--k 56"):
        check_compatible(saved, {**saved, "k": 10}, "c.pt")


def test_trainer_sets_the_scheduled_rate_on_every_optimizer(tmp_path):
    from pydc.train import main
    from pydc.utils.checkpoint import load_checkpoint
    from tests.test_train import TINY_FLAGS, make_image_folder, read_log

    data = make_image_folder(tmp_path / "data", per_class=8)  # 24 images, batches of 12: 2 steps an epoch
    output = tmp_path / "run"
    assert main(["--data", str(data), "--output", str(output), "--no-plots", "--no-eval", "--lr", "0.08",
                 "--lr-schedule", "cosine", "--warmup-epochs", "1", *TINY_FLAGS]) == 0
    epochs = [record for record in read_log(output) if "event" not in record]
    expected = [learning_rate(0.08, epoch + 0.5, 2, "cosine", 1.0) for epoch in (0, 1)]  # last step: batch 1 of 2
    assert [record["lr"] for record in epochs] == pytest.approx(expected)
    saved = load_checkpoint(output / "checkpoint.pt")
    for optimizer in ("optimizer", "head_optimizer"):
        assert [group["lr"] for group in saved[optimizer]["param_groups"]] == pytest.approx([expected[-1]])
