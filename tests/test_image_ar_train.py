"""configs/image_ar.py:tiny end to end: train.py on a few steps of the shapes world, the image_generation evaluator
(sampling through the engine, GenEval's scorer, PNG grids), evaluate.py, resuming, and one-line config errors."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import evaluate
import train
from configs import image_ar
from data import corpus, image_pipeline, shapes_world, tokenizer as tokenizer_lib
from errors import InputError
from evaluators import image_generation
from parallel import mesh as mesh_lib


def tiny_config(data_dir, **train_overrides):
    config = image_ar.get_config("tiny")
    config.data.tfds_data_dir = str(data_dir)
    config.train.update(train_overrides)
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    corpus.load_corpus(tiny_config(path).data)
    return path


@pytest.fixture(autouse=True)
def one_device(monkeypatch):
    """train.py and evaluate.py see one of the 8 fake devices: a batch of 8 runs fastest unsharded on 2 cores."""
    make_mesh = mesh_lib.make_mesh
    monkeypatch.setattr(mesh_lib, "make_mesh", lambda mesh_config, devices=None: make_mesh(mesh_config,
                                                                                           jax.devices()[:1]))


def test_tiny_run_trains_samples_and_scores(data_dir, tmp_path):
    workdir = tmp_path / "run"
    config = tiny_config(data_dir)
    history = train.train_and_evaluate(config, str(workdir))
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert all(entry["diffusion_loss"] > 0 and entry["text_loss"] > 0 for entry in history if "loss" in entry)
    scores = history[-1]
    assert scores["eval/validation/loss"] == pytest.approx(
        config.model.text_weight * scores["eval/validation/text_loss"] + scores["eval/validation/diffusion_loss"])
    assert scores["eval/validation/diffusion_loss"] > 0 and "eval/validation/perplexity" not in scores
    assert scores["eval/validation/null_caption_diffusion_loss"] != scores["eval/validation/diffusion_loss"]
    tasks = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    accuracies = [scores[f"eval/image_generation/geneval/{task}"] for task in tasks]
    assert all(0 <= a <= 1 for a in accuracies)
    assert scores["eval/image_generation/geneval/overall"] == pytest.approx(np.mean(accuracies))
    assert scores["eval/image_generation/images"] == 12  # 1 held-out prompt per task, 2 images each
    grids = json.loads((workdir / "image_generation" / "prompts.json").read_text())
    assert sorted(grids) == sorted(f"{task}_0.png" for task in tasks)
    assert Image.open(workdir / "image_generation" / "counting_0.png").size == (2 * 32 + 2, 32)

    results = evaluate.evaluate(tiny_config(data_dir), str(workdir))
    assert results["step"] == 4 and set(results["image_generation"]["geneval"]) == {*tasks, "overall"}
    assert os.path.exists(workdir / "eval_results.json")


def test_validation_batches_are_the_split_in_order_shared_between_hosts(data_dir):
    config = tiny_config(data_dir)
    config.data.global_batch_size = 4
    source = corpus.load_corpus(config.data)["validation"]
    tokenizer = tokenizer_lib.train_tokenizer(config.data, corpus.load_corpus(config.data)["train"],
                                              config.model.vocab_size)
    one_host = image_pipeline.eval_batches(config.data, tokenizer, source, num_batches=5, process_index=0,
                                           process_count=1)
    assert len(one_host) == len(source) // 4  # as many whole batches as the split holds
    assert np.array_equal(np.concatenate([batch["image"] for batch in one_host]), np.stack(
        [source[i]["image"] for i in range(len(one_host) * 4)]))
    hosts = [image_pipeline.eval_batches(config.data, tokenizer, source, num_batches=5, process_index=p,
                                         process_count=2) for p in range(2)]
    for batch, first, second in zip(one_host, *hosts):
        for key in batch:
            assert np.array_equal(batch[key], np.concatenate([first[key], second[key]]))
    without = image_pipeline.without_captions(one_host[0])
    assert (without["text"] == one_host[0]["text"][:, :1]).all() and not without["caption_tokens"].any()


def test_evaluation_prompts_are_the_held_out_or_the_seen_ones():
    seen, held_out = shapes_world.split_prompts(0.2)
    for prompt_set, pool in (("held_out", held_out), ("seen", seen)):
        prompts = image_generation.evaluation_prompts(prompt_set, 0.2, per_task=3, seed=0)
        for task in shapes_world.TASKS:
            chosen = [p["prompt"] for p in prompts if p["tag"] == task]
            assert len(chosen) == min(3, len(pool[task])) == len(set(chosen))
            assert set(chosen) <= {p["prompt"] for p in pool[task]}
    assert prompts == image_generation.evaluation_prompts("seen", 0.2, per_task=3, seed=0)
    assert prompts != image_generation.evaluation_prompts("seen", 0.2, per_task=3, seed=1)


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted_run(data_dir, tmp_path):
    straight = train.train_and_evaluate(tiny_config(data_dir, evaluate_every=0), str(tmp_path / "straight"))
    first = train.train_and_evaluate(tiny_config(data_dir, evaluate_every=0, stop_at_step=2), str(tmp_path / "resumed"))
    second = train.train_and_evaluate(tiny_config(data_dir, evaluate_every=0), str(tmp_path / "resumed"))
    assert [entry["step"] for entry in second] == [3, 4]
    assert [e["loss"] for e in first + second] == [e["loss"] for e in straight]


@pytest.mark.parametrize("key,value,message", [
    ("model.image_size", 30, r"config.model.image_size=30 cannot be tiled by config.model.patch_size=4"),
    ("evaluate.image_generation.steps.steps_low", 60,
     r"config.evaluate.image_generation.steps.steps_low=60 must be <= steps_up=4"),
    ("evaluate.image_generation.denoise.guidance_scale", -1.0,
     r"config.evaluate.image_generation.denoise.guidance_scale=-1.0 must be a finite number >= 0"),
    ("data.caption_tokens", 8, r"config.data.caption_tokens=8 cannot hold the caption"),
    ("evaluate.image_generation.prompts", "test",
     r"config.evaluate.image_generation.prompts='test' is not one of 'held_out', 'seen'"),
])
def test_bad_input_is_one_line_errors(data_dir, tmp_path, key, value, message):
    config = tiny_config(data_dir)
    section, _, name = key.rpartition(".")
    config_section = config
    for part in section.split("."):
        config_section = config_section[part]
    config_section[name] = value
    with pytest.raises(InputError, match=message) as error:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
def test_benchmark_compares_schedules_side_by_side(tmp_path):
    from benchmarks import image_ar as benchmark

    benchmark.main(["--preset", "tiny", "--schedules", "constant:4,linear:4:2,constant:2", "--prompts-per-task", "1",
                    "--images-per-prompt", "1", "--repeats", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "image_ar.json").read_text())
    assert (tmp_path / "image_ar.png").stat().st_size > 0
    assert report["params"] == "fresh" and report["images"] == 6
    steps = [row["diffusion_steps_per_image"] for row in report["results"]]
    assert steps[0] == 4 * 64 and steps[2] == 2 * 64 and steps[2] < steps[1] < steps[0]
    assert report["results"][0]["speedup"] == 1.0
    assert all(row["images_per_second"] > 0 and 0 <= row["geneval"]["overall"] <= 1 for row in report["results"])
