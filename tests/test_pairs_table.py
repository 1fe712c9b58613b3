"""benchmarks.pairs_table: the README's CPU-pairs table, from cpu_pairs JSON files."""

import json

import pytest

from benchmarks import pairs_table

ASSIGN = "kmeans_assign 100k x 256, k = 1000 / faiss IndexFlatL2.search(x, 1)"
WHERE = {"cpu_model": "Intel(R) Xeon(R) Processor (family 6 model 207)", "cpu_capability": "avx2",
         "cpu_threads": 2,
         "commit": "bf30ae04c4af98f8766004504921a28b07678905", "date": "2026-12-06T03:22:36+00:00",
         "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OPENBLAS_CORETYPE": "Haswell", "FAISS_OPT_LEVEL": "avx2"}


def run(where, **ratios):
    """A cpu_pairs output with the given pairs (what-prefix -> (pydc_s, reference_s))."""
    return {"where": where, "pairs": [{"what": f"{what} 100000x256", "pydc_s": ours, "reference_s": theirs}
                                      for what, (ours, theirs) in ratios.items()]}


def rows(text):
    return {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:-1] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| pair")}


def test_a_column_per_run_with_where_it_ran():
    capped = run(WHERE, kmeans_assign=(0.4, 0.5))
    own = run({**{k: v for k, v in WHERE.items() if k not in pairs_table.CAPS}, "cpu_capability": "avx512",
               "commit": "4ce8f683615b"}, kmeans_assign=(0.3, 2.0))
    text = pairs_table.table([capped, own])
    head = text.splitlines()[0]
    assert ("Intel Xeon Processor (family 6 model 207), `avx2` capped, 2 threads, bf30ae0, "
            "2026-12-06 03:22 UTC" in head)
    assert "`avx512`, 2 threads, 4ce8f68" in head and "`avx512` capped" not in head
    assert "capped: MKL_ENABLE_INSTRUCTIONS=AVX2, OPENBLAS_CORETYPE=Haswell, FAISS_OPT_LEVEL=avx2" in text
    assert rows(text)[ASSIGN] == ["**0.80** (400 ms vs 500 ms)", "**0.15** (0.3 s vs 2 s)"]


def test_the_caps_of_each_run_are_named_aten_first():
    earlier = run(WHERE, kmeans_assign=(0.4, 0.5))  # capped before ATen's level was
    later = run({**WHERE, "ATEN_CPU_CAPABILITY": "avx2"}, kmeans_assign=(0.4, 0.5))
    text = pairs_table.table([earlier, later])
    assert text.splitlines()[0].count("`avx2` capped") == 2
    assert text.splitlines()[-1] == (
        "capped: ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2, OPENBLAS_CORETYPE=Haswell, "
        "FAISS_OPT_LEVEL=avx2; MKL_ENABLE_INSTRUCTIONS=AVX2, OPENBLAS_CORETYPE=Haswell, FAISS_OPT_LEVEL=avx2 "
        "(and PYDC_CPU_CAPABILITY at the level named)")


@pytest.mark.parametrize("ours, theirs, missed", [(1.02, 1.0, True), (0.99, 1.0, False), (0.5, 0.5, False)])
def test_a_ratio_over_the_target_is_marked_missed(ours, theirs, missed):
    text = pairs_table.table([run(WHERE, kmeans_assign=(ours, theirs))])
    assert ("(missed)" in rows(text)[ASSIGN][0]) == missed


def test_each_pair_against_its_own_target_and_absent_pairs_dashed():
    pairs = {"PCA-whitening fit": (2.6, 10.0), "k-means unstructured": (2.6, 10.0)}
    text = pairs_table.table([run(WHERE, **pairs)])
    table = rows(text)
    assert table["PCA-whitening fit + transform 50k x 2048 -> 256 / faiss PCAMatrix(-0.5) + L2"][0].endswith(
        "(missed) (2.6 s vs 10 s)")  # 0.26 > 0.25
    assert "(missed)" not in table["k-means unstructured, same sizes / faiss-cpu"][0]  # 0.26 <= 0.5
    assert table["sobel_normalize 32x3x224x224 uint8 / torch chain"] == ["-"]


def test_main_reads_the_files(tmp_path, capsys):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(run(WHERE, sobel_normalize=(0.001, 0.125))))
    pairs_table.main([str(path)])
    assert "**0.008** (1 ms vs 125 ms)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="at least one"):
        pairs_table.table([])
