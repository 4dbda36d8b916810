"""Consistency training (models/cllm.py) on Jacobi trajectories (tools/jacobi_trajectories.py,
data/jacobi_trajectories.py): the losses against a numpy transcription of the reference trainer's arithmetic,
trajectories that are Jacobi iterations ending at greedy decoding, the tool resumed, a five-step run interrupted and
resumed equal to the uninterrupted one, and one-line errors."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_train import data_dir, losses, small_config  # noqa: F401  (data_dir is a fixture)

import train
from configs import cllm as cllm_config
from data import jacobi_trajectories
from errors import InputError
from models import cllm, llama
from tools import jacobi_trajectories as trajectories_tool

PAD = 0


# ---------------------------------------------------------------------------------------------------------------------
# The reference's arithmetic (cllm/cllm_trainer_global.py and transformers' LabelSmoother), in numpy: sequences are
# padded with PAD after their valid tokens, as the reference pads tokens after the first EOS.

def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_consistency(logits_i, logits_last, trajectory_i, trajectory_last):
    """soft_cross_entropy(logits_i[:, :-1], logits_last[:, :-1], output_mask) with the reference's output_mask."""
    output_mask = trajectory_i[:, 1:] == PAD
    for j in range(len(trajectory_i)):
        end_of_mask_position = np.nonzero(trajectory_i[j, 1:] != trajectory_last[j, 1:])[0]
        if len(end_of_mask_position) == 0:
            output_mask[j, :] = True
        else:
            output_mask[j, :end_of_mask_position[0]] = True
    predicts, targets = logits_i[:, :-1], logits_last[:, :-1]
    if (~output_mask).sum() == 0:
        return 0.0
    entropy = -np.exp(_log_softmax(targets)) * _log_softmax(predicts)
    entropy[output_mask] = 0
    return entropy.sum() / (~output_mask).sum()


def reference_label_smoothed(logits, labels, epsilon=0.1):
    """LabelSmoother(epsilon)(logits, labels, shift_labels=True), pads as ignore_index."""
    logits, labels = logits[:, :-1], labels[:, 1:].copy()
    log_probs = -_log_softmax(logits)
    padding_mask = labels == PAD
    labels[padding_mask] = 0
    nll_loss = np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    smoothed_loss = log_probs.sum(-1)
    nll_loss[padding_mask] = 0
    smoothed_loss[padding_mask] = 0
    num_active_elements = padding_mask.size - padding_mask.sum()
    nll_loss = nll_loss.sum() / num_active_elements
    smoothed_loss = smoothed_loss.sum() / (num_active_elements * log_probs.shape[-1])
    return (1 - epsilon) * nll_loss + epsilon * smoothed_loss


def test_losses_match_the_reference_arithmetic():
    rng = np.random.default_rng(0)
    B, L, V = 4, 12, 9
    end_B = np.array([12, 12, 9, 7])  # rows 2 and 3 end early (a stop token), padded after
    tokens_BL = rng.integers(1, V, (B, L))
    state_BL = tokens_BL.copy()
    state_BL[0, 6:] = rng.integers(1, V, 6)  # wrong from position 6 (and maybe later)
    state_BL[0, 6] = tokens_BL[0, 6] % (V - 1) + 1
    state_BL[2, 4] = tokens_BL[2, 4] % (V - 1) + 1  # wrong at 4 only; row 1 is the fixed point itself
    state_BL[3, 5:7] = tokens_BL[3, 5:7] % (V - 1) + 1
    for b, end in enumerate(end_B):
        tokens_BL[b, end:] = state_BL[b, end:] = PAD
    # The reference's logits are the model's on all L tokens; ours on the L - 1 inputs (the last predicts nothing).
    state_logits, teacher_logits = rng.normal(size=(2, B, L, V)) * 3
    state_logits_BTV, teacher_logits_BTV = jnp.asarray(state_logits[:, :-1]), jnp.asarray(teacher_logits[:, :-1])

    consistency = cllm.consistency_loss(state_logits_BTV, teacher_logits_BTV, jnp.asarray(state_BL),
                                        jnp.asarray(tokens_BL), jnp.asarray(end_B))
    np.testing.assert_allclose(consistency, reference_consistency(state_logits, teacher_logits, state_BL, tokens_BL),
                               rtol=1e-5)
    ar, nll = cllm.smoothed_next_token_loss(teacher_logits_BTV, jnp.asarray(tokens_BL), jnp.asarray(end_B), 0.1)
    np.testing.assert_allclose(ar, reference_label_smoothed(teacher_logits, tokens_BL, 0.1), rtol=1e-5)
    np.testing.assert_allclose(nll, reference_label_smoothed(teacher_logits, tokens_BL, 0.0), rtol=1e-5)

    # The target is stopped: no gradient reaches the teacher's logits through the consistency loss.
    grads = jax.grad(cllm.consistency_loss, argnums=(0, 1))(
        state_logits_BTV, teacher_logits_BTV, jnp.asarray(state_BL), jnp.asarray(tokens_BL), jnp.asarray(end_B))
    assert np.abs(grads[0]).max() > 0 and np.abs(grads[1]).max() == 0
    # A state equal to its fixed point counts nothing.
    assert float(cllm.consistency_loss(state_logits_BTV, teacher_logits_BTV, jnp.asarray(tokens_BL),
                                       jnp.asarray(tokens_BL), jnp.asarray(end_B))) == 0


def _tiny_model(model_module=llama, **fields):
    config = model_module.Config(vocab_size=48, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                                 mlp_dim=64, max_seq_len=128, **fields)
    model = model_module.Model(config)
    params = nn.meta.unbox(model.init(jax.random.key(0), *model.example_inputs())["params"])
    return model, jax.tree.map(lambda x: 3.0 * x, params)  # larger weights: the argmax depends on the context


def test_model_loss_is_the_reference_losses_of_its_own_logits():
    """models/cllm.Model.loss on batches laid out from records (one state each, so the drawn state is known)."""
    model, params = _tiny_model(cllm, ar_weight=10.0, consistency_weight=1.0, label_smoothing=0.1)
    rng = np.random.default_rng(1)
    W, seq_len = 4, 15
    layout = jacobi_trajectories._Layout(seq_len)
    rows = []
    for context_length, valid in ((5, 4), (9, 2), (20, 4)):  # the last context is cut to fit the row
        fixed = rng.integers(1, 48, W)
        state = fixed.copy()
        state[1:] = rng.integers(1, 48, W - 1)
        record = jacobi_trajectories.encode(rng.integers(1, 48, context_length), state[None], fixed, valid)
        decoded = jacobi_trajectories.decode(record)
        assert decoded["valid"] == valid and decoded["states"].tolist() == [state.tolist()]
        rows.append(layout.map(record))
    batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
    assert batch["tokens"].shape == (3, seq_len + 1) and batch["window_start"].tolist() == [5, 9, seq_len + 1 - W]
    loss, metrics = model.loss(params, jax.tree.map(jnp.asarray, batch), jax.random.key(0))

    tokens, end = batch["tokens"].copy(), batch["window_start"] + batch["valid"]
    state_tokens = tokens.copy()
    for b in range(3):
        state_tokens[b, batch["window_start"][b]:batch["window_start"][b] + W] = batch["states"][b, 0]
        tokens[b, end[b]:] = state_tokens[b, end[b]:] = PAD
    teacher_logits = np.asarray(model.apply({"params": params}, jnp.asarray(tokens))[0])
    state_logits = np.asarray(model.apply({"params": params}, jnp.asarray(state_tokens))[0])
    consistency = reference_consistency(state_logits, teacher_logits, state_tokens, tokens)
    ar = reference_label_smoothed(teacher_logits, tokens, 0.1)
    np.testing.assert_allclose(metrics["consistency_loss"], consistency, rtol=1e-4)
    np.testing.assert_allclose(metrics["ar_loss"], ar, rtol=1e-4)
    np.testing.assert_allclose(loss, consistency + 10 * ar, rtol=1e-4)

    # On a text batch (the validation split's) it is the language model's loss.
    text = {"tokens": jnp.asarray(batch["tokens"])}
    llama_model = llama.Model(llama.Config(**{f.name: getattr(model.config, f.name)
                                              for f in dataclasses.fields(llama.Config)}))
    np.testing.assert_allclose(model.loss(params, text)[0], llama_model.loss(params, text)[0], rtol=1e-6)


def _section(**overrides):
    return ml_collections.ConfigDict({**dict(window=4, num_prompts=6, prompt_tokens=12, new_tokens=12, batch_size=3,
                                             prompts_per_shard=3, max_identical_run=0), **overrides})


@pytest.mark.parametrize("mixer_pattern", ["softmax", pytest.param("lightning,softmax", marks=pytest.mark.slow)])
def test_trajectories_are_jacobi_iterations_that_end_at_greedy_decoding(mixer_pattern):
    model, params = _tiny_model(mixer_pattern=mixer_pattern, lightning_block_size=8)
    prompts = np.random.default_rng(2).integers(1, 48, (3, 12)).tolist()
    stop_token = 47
    records, counts = trajectories_tool.trajectories(model, params, prompts, _section(), stop_token)
    assert counts["blocks"] >= len(records) > 0 and counts["states"] > len(records)

    def argmax_after(context, window):
        """argmax p(. | context, window_<i) for each i: one Jacobi update of the window."""
        logits = model.apply({"params": params}, jnp.asarray([list(context) + list(window)]))[0][0]
        return np.asarray(jnp.argmax(logits[len(context) - 1:len(context) - 1 + len(window)], axis=-1))

    for record in map(jacobi_trajectories.decode, records):
        context, states, fixed = record["context"], record["states"], record["fixed_point"]
        assert (states[0] == context[-1]).all()  # a block starts as copies of the newest token
        for state, following in zip(states, list(states[1:]) + [fixed]):
            np.testing.assert_array_equal(argmax_after(context, state), following)
            assert (state != fixed).any()
        np.testing.assert_array_equal(argmax_after(context, fixed), fixed)  # the fixed point is greedy decoding
        stops = np.flatnonzero(fixed == stop_token)
        assert record["valid"] == (stops[0] + 1 if len(stops) else 4)


def test_the_tool_resumes_and_a_five_step_run_resumed_equals_the_uninterrupted_one(data_dir, tmp_path):  # noqa: F811
    base_workdir = str(tmp_path / "base")
    train.train_and_evaluate(small_config(data_dir, num_steps=1), base_workdir)

    def config(**train_overrides):
        c = small_config(data_dir, **train_overrides)
        c.model.name = "cllm"
        c.model.update(consistency_weight=1.0, ar_weight=10.0, label_smoothing=0.1)
        c.init_from = f"workdir:{base_workdir}"
        c.data.trajectories = str(tmp_path / "trajectories")
        c.trajectories = _section(num_prompts=8, prompt_tokens=16, new_tokens=8)
        return c

    directory = str(tmp_path / "trajectories")
    info = trajectories_tool.write(config(), directory)
    assert info["shards"] == 3 and info["prompts"] == 8 and info["records"] > 0 and info["bytes"] > 0
    shards = jacobi_trajectories.shard_paths(directory)
    last = open(shards[-1], "rb").read()
    os.remove(shards[-1])  # as if killed while writing the last shard: the rerun writes only it, the same
    os.remove(os.path.join(directory, jacobi_trajectories.INFO_FILE))
    with pytest.raises(InputError, match="is incomplete; write them with python tools/jacobi_trajectories.py"):
        jacobi_trajectories.info(directory)
    before = {path: os.path.getmtime(path) for path in shards[:-1]}
    again = trajectories_tool.write(config(), directory)
    assert open(shards[-1], "rb").read() == last and {p: os.path.getmtime(p) for p in shards[:-1]} == before
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in info.items() if k != "seconds"}
    with pytest.raises(InputError, match=r"holds trajectories written with other settings \(window differ\)"):
        trajectories_tool.write(ml_collections.ConfigDict({**config().to_dict(), "trajectories": _section(
            num_prompts=8, prompt_tokens=16, new_tokens=8, window=2)}), directory)

    straight = train.train_and_evaluate(config(num_steps=5, checkpoint_every=2), str(tmp_path / "straight"))
    assert {"consistency_loss", "ar_loss", "next_token_loss"} <= set(straight[0])
    workdir = str(tmp_path / "resumed")
    first = train.train_and_evaluate(config(num_steps=5, checkpoint_every=2, stop_at_step=3), workdir)
    second = train.train_and_evaluate(config(num_steps=5, checkpoint_every=2), workdir)
    assert [entry["step"] for entry in second] == [4, 5]
    assert losses(first + second) == losses(straight)
    assert [e["consistency_loss"] for e in first + second] == [e["consistency_loss"] for e in straight]


def test_bad_input_gives_one_line_errors(data_dir, tmp_path):  # noqa: F811
    config = small_config(data_dir)
    config.model.name = "cllm"
    with pytest.raises(InputError, match=r"config.model.name='cllm' trains on jacobi_trajectories batches, which "
                                         r"need config.data.trajectories set to a directory"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    config.data.trajectories = str(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"config.data.trajectories='.*nowhere' has no Jacobi trajectories"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    config.model.name = "llama"
    with pytest.raises(InputError, match=r"config.model.name='llama' trains on text batches, which need "
                                         r"config.data.trajectories=''"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")

    tool_config = cllm_config.get_config("tiny")
    tool_config.trajectories.new_tokens = 20
    with pytest.raises(InputError, match="config.trajectories.new_tokens=20 must be a multiple of "
                                         "config.trajectories.window=16"):
        trajectories_tool.write(tool_config, str(tmp_path / "tool"))
    tool_config.trajectories.new_tokens, tool_config.init_from = 64, ""
    with pytest.raises(InputError, match="config.init_from is empty: Jacobi trajectories come from a base model"):
        trajectories_tool.write(tool_config, str(tmp_path / "tool"))
    with pytest.raises(InputError, match="config.model.consistency_weight=-1.0 must be a finite number >= 0"):
        cllm.Config(vocab_size=8, num_layers=1, embed_dim=8, num_heads=1, num_kv_heads=1, head_dim=8, mlp_dim=8,
                    consistency_weight=-1.0)


def test_configs_cllm_builds_the_llama_parameters():
    """configs/cllm.py's model is a CLLM with Llama's parameters, so Llama checkpoints of every format load into it."""
    from models import registry

    config = cllm_config.get_config("tiny")
    model = registry.build(config.model)
    assert isinstance(model, cllm.Model) and registry.parameters_of("cllm") == "llama"
    llama_config = {k: v for k, v in config.model.items() if k not in
                    ("name", "consistency_weight", "ar_weight", "label_smoothing")}
    shapes = lambda m: jax.tree.map(lambda x: x.shape, jax.eval_shape(m.init, jax.random.key(0),
                                                                      *m.example_inputs())["params"])
    assert shapes(model) == shapes(llama.Model(llama.Config(**llama_config)))
    assert json.dumps(config.trajectories.to_dict())  # the tool's section is plain values
