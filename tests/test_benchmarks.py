"""The benchmark scripts run end to end at toy sizes and write what their docstrings promise (no timing is checked)."""

import json

import numpy as np
import pytest

from benchmarks import decode, lightning


def test_decode_benchmark_matches_transformers_and_reports_the_roofline(tmp_path):
    pytest.importorskip("transformers")
    decode.main(["--presets", "tiny", "--batch-sizes", "1,2", "--max-new-tokens", "4", "--repeats", "1",
                 "--torch-threads", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "decode.json").read_text())
    assert (tmp_path / "decode.png").stat().st_size > 0
    assert [(r["preset"], r["batch"]) for r in report["results"]] == [("tiny", 1), ("tiny", 2)]
    for result in report["results"]:
        assert result["tokens_equal_hf_fraction"] == 1.0  # same weights, greedy: the same tokens
        assert result["bytes_per_step"] > 4 * result["params"]  # float32 params plus the cache
        assert 0 < result["roofline_fraction"] and 0 < result["hf_roofline_fraction"]
        assert np.isclose(result["speedup_vs_hf"], result["hf_generate_s"] / result["decodelab_end_to_end_s"])


def test_lightning_benchmark_writes_every_provider(tmp_path):
    lightning.main(["--lengths", "64,128", "--heads", "2", "--dim", "16", "--min-time", "0", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "lightning.json").read_text())
    assert (tmp_path / "lightning.png").stat().st_size > 0
    seconds = report["seconds"]
    assert {"chunked (jnp)", "softmax (xla)"} <= seconds.keys()
    for name, by_mode in seconds.items():
        for mode in ("fwd", "fwd+bwd"):
            timed = [t for t, s in by_mode[mode].items() if s is not None]
            # Pallas runs interpreted on CPU, at the smallest length only.
            assert timed == (["64"] if name.startswith("pallas (interpret") else ["64", "128"]), (name, mode)
