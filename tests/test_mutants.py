"""The planted-bug check (tests/mutants/): the catalogue applies to the tree as it is, and every Python mutant
is caught by the tests it names. C++ mutants need a rebuild and run under `make mutants` only."""

from __future__ import annotations

import pytest

from tests.mutants import run


def test_catalogue_applies_to_the_current_tree():
    mutants = run.load_catalogue()
    assert {m.kind for m in mutants} == set(run.KINDS)
    for mutant in mutants:
        texts = run.patched_sources(mutant, run.REPO)  # raises "does not apply" when a snippet is gone
        assert all(original != mutated for original, mutated in texts.values())
        for test_file in run.test_files(mutant):
            assert (run.REPO / test_file).is_file(), f"mutant {mutant.id} names a missing file {test_file}"


def test_a_mutant_whose_snippet_is_gone_fails_loudly(tmp_path):
    (tmp_path / "module.py").write_text("x = 1\nx = 1\n")
    gone = run.Mutant("gone", "python", "", ("tests/x.py",), (run.Patch("module.py", "y = 2", "y = 3"),))
    with pytest.raises(run.MutantError, match="mutant gone does not apply: its snippet is not in module.py"):
        run.patched_sources(gone, tmp_path)
    twice = run.Mutant("twice", "python", "", ("tests/x.py",), (run.Patch("module.py", "x = 1", "x = 2"),))
    with pytest.raises(run.MutantError, match="occurs 2 times"):
        run.patched_sources(twice, tmp_path)


@pytest.mark.slow
def test_every_python_mutant_is_caught(tmp_path, capsys):
    # The named tests run in this suite as well, so the baseline (the same tests without a mutant) is skipped.
    mutants = [m for m in run.load_catalogue() if m.kind == "python"]
    results = run.run_mutants(mutants, tmp_path, baseline=False)
    assert results == {m.id: "caught" for m in mutants}, capsys.readouterr().out
