"""pydc.utils.validate and pydc.data.screen on their own (the command-line table is tests/test_bad_inputs.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pydc.data import screen
from pydc.data.screen import NoUsableImages, require_enough_images, screen_files, spread_positions
from pydc.utils.options import get_args_parser, parse_args
from pydc.utils.validate import RANGES, OptionError, Range, check_values


def test_every_range_names_an_option():
    destinations = {action.dest for action in get_args_parser()._actions}
    assert set(RANGES) <= destinations, set(RANGES) - destinations


def test_every_numeric_option_has_a_range():
    numeric = {action.dest for action in get_args_parser()._actions if action.type in (int, float)}
    assert numeric <= set(RANGES), numeric - set(RANGES)


@pytest.mark.parametrize("allowed, inside, outside, text", [
    (Range(1), [1, 10**9], [0, -5], ">= 1"),
    (Range(0, 1, low_open=True), [1e-9, 1.0], [0.0, 1.5, float("nan")], "in (0, 1]"),
    (Range(0, 1, high_open=True), [0.0, 0.999], [1.0, -0.1], "in [0, 1)"),
])
def test_range(allowed, inside, outside, text):
    assert all(value in allowed for value in inside)
    assert not any(value in allowed for value in outside)
    assert allowed.describe() == text


def test_defaults_pass_and_config_integers_become_floats(tmp_path):
    args = parse_args([])
    check_values(args)
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1\nepochs: 3\n")
    args = parse_args(["--config", str(config)])
    assert args.lr == 1.0 and isinstance(args.lr, float) and args.epochs == 3


def test_check_values_raises_option_error_naming_the_flag():
    args = parse_args([])
    args.batch_size = 0
    with pytest.raises(OptionError, match="--batch-size: expected an integer >= 1, got 0"):
        check_values(args)


def test_spread_positions():
    assert spread_positions(5, 64) == [0, 1, 2, 3, 4]
    positions = spread_positions(1000, 10)
    assert positions[0] == 0 and positions[-1] == 999 and len(positions) == 10
    assert positions == sorted(set(positions))


def _png(path, size):
    Image.fromarray(np.full((size, size, 3), 90, dtype=np.uint8)).save(path)
    return str(path)


def test_screen_stops_at_the_first_decodable_file(tmp_path, monkeypatch):
    paths = [_png(tmp_path / f"{i}.png", 16) for i in range(10)]
    probed = []
    real_probe = screen.probe
    monkeypatch.setattr(screen, "probe", lambda path, *rest: probed.append(path) or real_probe(path, *rest))
    screen_files(paths)
    assert probed == paths[:1]


def test_screen_counts_failures_by_kind_with_examples(tmp_path):
    paths = [str(tmp_path / f"text{i}.jpg") for i in range(5)] + [str(tmp_path / f"empty{i}.png") for i in range(2)]
    for path in paths:
        with open(path, "w") as handle:
            handle.write("text" if "text" in path else "")
    paths.append(_png(tmp_path / "tiny.png", 2))
    with pytest.raises(NoUsableImages) as error:
        screen_files(sorted(paths), limit=64)
    message = str(error.value)
    assert "all 8" in message and "5 not an image (e.g. " in message and "2 empty file" in message
    assert "1 too small" in message and message.count("text") == 3  # three examples of five
    assert message.index("5 not an image") < message.index("2 empty file")  # the commonest first


def test_require_enough_images(tmp_path):
    (tmp_path / "bad.jpg").write_text("x")
    require_enough_images({"decoded": 3, "skipped": 1, "skipped_files": {str(tmp_path / "bad.jpg")}}, 3, tmp_path)
    with pytest.raises(NoUsableImages, match=r"2 images decoded, fewer than --k 3 clusters; skipped: 1 not an image"):
        require_enough_images({"decoded": 2, "skipped": 1, "skipped_files": {str(tmp_path / "bad.jpg")}}, 3,
                              tmp_path)
