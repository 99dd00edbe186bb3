"""The research levers (TrainConfig fields whose defaults are SPEC's) and the overfit check's pieces:
the sign of the update, the reward's split into adapter and query parts, each lever on a tiny model."""

from __future__ import annotations

import itertools

import pytest
import torch

from attnrl_core.config import TrainConfig
from attnrl_core.data import iter_key_value_batches, iter_pair_batches
from attnrl_core.diagnostics import learning_figure
from attnrl_core.embeddings import (choice_logprob, extract_embeddings, key_embedding_fn, query_embeddings,
                                   selection_probabilities)
from attnrl_core.loss import advantages, choice_target_kl
from attnrl_core.model import attach_adapter, attention_layer, base_model
from attnrl_core.rollout import rollout
from attnrl_core.training import (choice_target_options, choice_target_step, make_optimizer, query_logits,
                                 update_policy, value_nll)

from .conftest import SEP, make_batch, tiny_config, tiny_llama


def _rollout(model, cfg, seed=0, **kwargs):
    torch.manual_seed(seed)
    return rollout(model, make_batch(model, cfg, seed), SEP, _geo(model), tokens_per_query=cfg.tokens_per_query,
                   **kwargs)


def _geo(model):
    from attnrl_core.model import head_geometry

    return head_geometry(model)


def _query_logprob(model, traj, row: int) -> float:
    """Summed log-prob of trajectory `row`'s query tokens under the model now (teacher-forced)."""
    with torch.no_grad():
        logits = query_logits(model, traj.tokens[row:row + 1].clone(), traj.query_positions)
        logp = torch.log_softmax(logits.float(), dim=-1)
        return float(logp.gather(-1, traj.query_tokens[row:row + 1, :, None].clone()).sum())


# -- the sign of the update ------------------------------------------------------------------------------
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_rewarded_query_becomes_more_likely_and_a_penalised_one_less(sign):
    """REINFORCE's direction: R > 0 raises the trajectory's query log-prob, R < 0 lowers it (fails if the
    loss's sign were flipped)."""
    cfg = tiny_config(learning_rate=1e-2)
    model = attach_adapter(tiny_llama(), cfg)
    traj = _rollout(model, cfg)
    before = _query_logprob(model, traj, 0)
    selected = torch.tensor([True, False, False, False])
    rewards = torch.tensor([sign, 0.0, 0.0, 0.0])
    optimizer = make_optimizer(model, cfg)
    for _ in range(3):  # the first step of a zero-initialised LoRA B moves little
        update_policy(model, optimizer, traj, selected, training_batch_size=1, beta=0.0, rewards=rewards)
    after = _query_logprob(model, traj, 0)
    assert (after - before) * sign > 0.05, (before, after)


# -- the reward's split --------------------------------------------------------------------------------
def test_reward_splits_into_adapter_and_query_parts(policy):
    cfg = tiny_config()
    traj = _rollout(policy, cfg)
    torch.testing.assert_close(traj.adapter_reward + traj.query_reward, traj.rewards, rtol=0, atol=1e-5)
    fresh = attach_adapter(tiny_llama(), cfg)  # LoRA B = 0: the adapter adds nothing
    assert _rollout(fresh, cfg).adapter_reward.abs().max() < 1e-5
    assert traj.adapter_reward.abs().max() > 1e-3  # a trained adapter does


def test_base_same_logprob_is_the_base_model_after_the_policys_query(policy):
    """The split's middle term, re-derived by teacher forcing the policy's final sequence with the adapter off."""
    cfg = tiny_config()
    traj = _rollout(policy, cfg)
    with torch.no_grad(), base_model(policy):
        logits = query_logits(policy, traj.tokens.clone(), traj.value_positions).float()
    values = traj.tokens[:, traj.value_positions]
    logp = logits.log_softmax(-1).gather(-1, values[..., None]).squeeze(-1)
    expected = logp.view(traj.batch_size, traj.num_steps, -1).mean(dim=2)
    torch.testing.assert_close(traj.base_same_logprob, expected, rtol=0, atol=1e-4)


# -- similarity_layer -------------------------------------------------------------------------------------
def test_similarity_layer_embeds_with_that_layers_projections(policy):
    ids = torch.randint(10, 300, (3, 4))
    for layer in (0, -1):
        expected = extract_embeddings(policy, ids, attention_layer(policy, layer).q_proj)
        torch.testing.assert_close(query_embeddings(policy, ids, layer), expected)
    assert not torch.allclose(query_embeddings(policy, ids, 0), query_embeddings(policy, ids, -1))
    with pytest.raises(ValueError, match="similarity_layer=5 is outside the model's 2 layers"):
        attention_layer(policy, 5)


def test_rollout_at_another_similarity_layer_uses_its_keys(policy):
    cfg = tiny_config()
    batch = make_batch(policy, cfg)
    batch.key_embeddings = key_embedding_fn(policy, torch.device("cpu"), layer=0)(
        batch.key_tokens.flatten(0, 1)).view(*batch.key_tokens.shape[:2], -1)
    geo = _geo(policy)
    torch.manual_seed(0)
    first = rollout(policy, batch, SEP, geo, tokens_per_query=cfg.tokens_per_query, similarity_layer=0)
    q = query_embeddings(policy, first.queries[:, 0], 0)
    from attnrl_core.embeddings import compute_similarity

    available = first.available[:, 0]
    expected = compute_similarity(q, batch.key_embeddings, geo.num_query_heads, geo.num_kv_heads, 1.0, available)
    torch.testing.assert_close(first.probabilities[:, 0], expected, rtol=0, atol=1e-6)


# -- choice_in_loss ------------------------------------------------------------------------------------
def test_choice_logprob_is_the_rollouts_probability_and_has_a_gradient(policy):
    cfg = tiny_config()
    traj = _rollout(policy, cfg, similarity_temperature=3.0)
    keys = traj.batch.key_embeddings.clone()
    logp = choice_logprob(policy, traj.queries.clone(), keys, traj.available.clone(), traj.choices.clone(), 3.0)
    torch.testing.assert_close(logp, traj.choice_probs.log(), rtol=0, atol=1e-5)
    logp.sum().backward()
    q_lora = [p for n, p in policy.named_parameters() if "layers.1.self_attn.q_proj.lora" in n]
    assert q_lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in q_lora)


def test_choice_in_loss_changes_the_update_only_through_the_choice():
    cfg = tiny_config(learning_rate=1e-2)
    results = {}
    for flag in (False, True):
        model = attach_adapter(tiny_llama(), cfg)
        from .conftest import randomize_adapter

        randomize_adapter(model)
        traj = _rollout(model, cfg, similarity_temperature=3.0)
        upd = update_policy(model, make_optimizer(model, cfg), traj, torch.ones(4, dtype=torch.bool),
                            training_batch_size=4, beta=0.0, choice_in_loss=flag, similarity_temperature=3.0)
        results[flag] = upd.policy_loss, -(traj.avg_reward * traj.choice_probs.log().sum(1)).mean().item()
    assert results[True][0] == pytest.approx(results[False][0] + results[True][1], rel=1e-4, abs=1e-5)


# -- choice_target_weight: the selection objective --------------------------------------------------------
def test_choice_target_kl_is_zero_at_the_target_and_positive_elsewhere():
    rewards = torch.tensor([[[0.1, -0.2, float("nan"), 0.3], [float("nan"), 0.5, float("nan"), float("nan")]]])
    available = ~rewards.isnan()
    target = torch.softmax((rewards / 0.1).masked_fill(~available, float("-inf")), dim=-1)
    assert choice_target_kl(target, rewards, 0.1).abs().item() < 1e-6  # the forced second step adds 0 too
    uniform = available.float() / available.sum(-1, keepdim=True)
    expected = (target[0, 0, available[0, 0]] * (target[0, 0, available[0, 0]] / (1 / 3)).log()).sum()
    torch.testing.assert_close(choice_target_kl(uniform, rewards, 0.1), expected.view(1))


def _choice_rollout(model, cfg, layer=-1):
    return _rollout(model, cfg, similarity_temperature=3.0, oracle=True, similarity_layer=layer)


def _selection_kl(model, traj, tau, layer=-1):
    with torch.no_grad():
        probs = selection_probabilities(model, traj.queries.clone(), traj.batch.key_embeddings.clone(),
                                        traj.available.clone(), 3.0, layer)
    return choice_target_kl(probs, traj.candidate_rewards.clone(), tau).mean().item(), probs


def test_selection_probabilities_are_the_rollouts_and_one_step_moves_them_toward_the_target(policy):
    cfg = tiny_config(num_kv_pairs=8, learning_rate=1e-2)
    traj = _choice_rollout(policy, cfg)
    before, probs = _selection_kl(policy, traj, 0.05)
    torch.testing.assert_close(probs, traj.probabilities, rtol=0, atol=1e-6)  # what the rollout drew from
    step = choice_target_step(policy, make_optimizer(policy, cfg), traj, weight=1.0, target_temperature=0.05,
                              training_batch_size=3, similarity_temperature=3.0)  # 4 rows: micro-batches of 3 + 1
    assert step.kl == pytest.approx(before, rel=1e-5) and not step.skipped
    after, _ = _selection_kl(policy, traj, 0.05)
    assert after < before - 1e-3


def test_k_selection_steps_are_k_single_steps_on_the_same_batch(policy):
    from attnrl_core.model import adapter_parameters

    cfg = tiny_config(num_kv_pairs=8, learning_rate=1e-2)
    traj = _choice_rollout(policy, cfg)
    start = [p.detach().clone() for p in adapter_parameters(policy)]
    opts = dict(weight=1.0, target_temperature=0.05, training_batch_size=4, similarity_temperature=3.0)
    opt = make_optimizer(policy, cfg)
    singles = [choice_target_step(policy, opt, traj, **opts) for _ in range(3)]
    after_singles = [p.detach().clone() for p in adapter_parameters(policy)]
    with torch.no_grad():
        for p, v in zip(adapter_parameters(policy), start):
            p.copy_(v)
    three = choice_target_step(policy, make_optimizer(policy, cfg), traj, steps=3, **opts)
    for p, v in zip(adapter_parameters(policy), after_singles):
        torch.testing.assert_close(p.detach(), v, rtol=0, atol=1e-6)
    assert three.kl == pytest.approx(singles[0].kl, rel=1e-5) and three.grad_norm == pytest.approx(singles[0].grad_norm)
    assert three.kl_last == pytest.approx(singles[2].kl, rel=1e-5) and three.kl_last < three.kl
    assert singles[0].kl_last == singles[0].kl  # one step: the last pass is the first


def test_the_selection_objective_reaches_the_q_proj_lora_of_the_similarity_layer_only(policy):
    cfg = tiny_config(num_kv_pairs=8)
    traj = _choice_rollout(policy, cfg, layer=0)
    probs = selection_probabilities(policy, traj.queries.clone(), traj.batch.key_embeddings.clone(),
                                    traj.available.clone(), 3.0, 0)
    choice_target_kl(probs, traj.candidate_rewards.clone(), 0.1).sum().backward()
    grads = {n: p.grad for n, p in policy.named_parameters() if "lora" in n}
    layer0 = [g for n, g in grads.items() if "layers.0.self_attn.q_proj" in n]
    assert layer0 and all(g is not None and g.abs().sum() > 0 for g in layer0)
    assert all(g is None for n, g in grads.items() if "layers.1." in n)  # above the similarity layer: unreached


@pytest.mark.parametrize("reach", ["q_proj", "below"])
def test_the_selection_objectives_reach_is_that_q_proj_or_also_the_layers_below(policy, reach):
    traj = _choice_rollout(policy, tiny_config(num_kv_pairs=8), layer=1)
    probs = selection_probabilities(policy, traj.queries.clone(), traj.batch.key_embeddings.clone(),
                                    traj.available.clone(), 3.0, 1, reach)
    choice_target_kl(probs, traj.candidate_rewards.clone(), 0.1).sum().backward()
    grads = {n: p.grad for n, p in policy.named_parameters() if "lora" in n}
    own = [g for n, g in grads.items() if "layers.1.self_attn.q_proj" in n]
    below = [g for n, g in grads.items() if "layers.0." in n]
    assert own and all(g is not None and g.abs().sum() > 0 for g in own)
    if reach == "q_proj":
        assert all(g is None for g in below)
        assert all(g is None for n, g in grads.items() if "layers.1.self_attn.v_proj" in n)
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in below)


# The candidates' rewards equal re-encoding each candidate from scratch:
# tests/test_rollout.py::test_oracle_scores_every_pair_left_as_re_encoding_would.


def test_the_update_phase_takes_the_selection_step_over_every_trajectory_even_when_none_is_selected(policy):
    from attnrl_core.resilience import FallbackState, update_resilient
    from attnrl_core.rundir import choice_metrics

    cfg = tiny_config(num_kv_pairs=8, choice_target_weight=1.0, temperature=3.0)  # the rollout's temperature
    traj = _choice_rollout(policy, cfg)
    before, _ = _selection_kl(policy, traj, cfg.choice_target_temperature)
    upd, choice, _ = update_resilient(policy, make_optimizer(policy, cfg), traj, torch.zeros(4, dtype=torch.bool),
                                      FallbackState(4, 2, 1), str, choice_target=choice_target_options(cfg),
                                      similarity_temperature=3.0)
    assert upd is None and choice is not None and choice.kl == pytest.approx(before, rel=1e-5)
    assert _selection_kl(policy, traj, cfg.choice_target_temperature)[0] < before  # the step was taken
    metrics = choice_metrics(traj, choice)
    cand = traj.candidate_rewards
    best, mean = cand.nan_to_num(float("-inf")).amax(2), cand.nanmean(2)
    expected = ((traj.rewards - mean).sum() / (best - mean).sum()).item()
    assert metrics["choice_kl"] == choice.kl and metrics["oracle_fraction"] == pytest.approx(expected, rel=1e-5)
    assert metrics["target_oracle_fraction"] == metrics["oracle_fraction"]  # the target is the reward
    assert choice_metrics(_rollout(policy, cfg), None) == {"oracle_fraction": None, "target_oracle_fraction": None,
                                                          "choice_kl": None, "choice_grad_norm": None,
                                                          "choice_kl_last": None, "hindsight_nll": None,
                                                          "hindsight_nll_last": None}


def test_a_logprob_target_fits_the_policys_value_logprob_of_each_pair_and_logs_its_own_oracle_fraction(policy):
    """choice_target_score logprob: the target ranks the pairs left by the policy's log-prob of their values
    (no counterfactual query), one step moves p_select toward it, and target_oracle_fraction is measured on it."""
    from attnrl_core.rundir import choice_metrics

    cfg = tiny_config(num_kv_pairs=8, learning_rate=1e-2, choice_target_weight=1.0, choice_target_score="logprob",
                      choice_target_temperature=0.05, temperature=3.0)
    traj = _choice_rollout(policy, cfg)
    assert not torch.equal(traj.candidate_logprobs.nan_to_num(), traj.candidate_rewards.nan_to_num())
    with torch.no_grad():
        probs = selection_probabilities(policy, traj.queries.clone(), traj.batch.key_embeddings.clone(),
                                        traj.available.clone(), 3.0)
    before = choice_target_kl(probs, traj.candidate_logprobs.clone(), 0.05).mean().item()
    step = choice_target_step(policy, make_optimizer(policy, cfg), traj, training_batch_size=4,
                              **choice_target_options(cfg))
    assert step.kl == pytest.approx(before, rel=1e-5)
    with torch.no_grad():
        probs = selection_probabilities(policy, traj.queries.clone(), traj.batch.key_embeddings.clone(),
                                        traj.available.clone(), 3.0)
    assert choice_target_kl(probs, traj.candidate_logprobs.clone(), 0.05).mean().item() < before - 1e-3
    cand = traj.candidate_logprobs
    best, mean = cand.nan_to_num(float("-inf")).amax(2), cand.nanmean(2)
    expected = ((traj.policy_logprob - mean).sum() / (best - mean).sum()).item()
    metrics = choice_metrics(traj, step, "logprob")
    assert metrics["target_oracle_fraction"] == pytest.approx(expected, rel=1e-5)
    assert metrics["oracle_fraction"] == choice_metrics(traj, step)["oracle_fraction"]  # still the reward's


def test_the_selection_objective_is_off_by_default_and_specs_loss_has_no_selection_term():
    assert TrainConfig().choice_target_weight == 0.0 and choice_target_options(TrainConfig()) is None
    cfg = TrainConfig.from_preset("embedded", choice_target_weight=0.5, choice_target_temperature=0.2)
    assert choice_target_options(cfg)["weight"] == 0.5 and choice_target_options(cfg)["target_temperature"] == 0.2
    assert TrainConfig().choice_target_steps == 1 and choice_target_options(cfg)["steps"] == 1
    assert TrainConfig().choice_target_score == "reward" and choice_target_options(cfg)["score"] == "reward"


# -- value_nll_weight -----------------------------------------------------------------------------------
def test_value_nll_is_the_rollouts_policy_logprob_and_it_learns_the_values(policy):
    cfg = tiny_config(learning_rate=2e-2)
    traj = _rollout(policy, cfg)
    with torch.no_grad():
        logits = query_logits(policy, traj.tokens.clone(), traj.value_positions)
    nll = value_nll(logits, traj.tokens[:, traj.value_positions].clone())
    torch.testing.assert_close(nll, -traj.policy_logprob.mean(dim=1), rtol=0, atol=1e-4)
    optimizer = make_optimizer(policy, cfg)
    everything = torch.ones(4, dtype=torch.bool)
    first = update_policy(policy, optimizer, traj, everything, training_batch_size=4, beta=0.0,
                          rewards=torch.zeros(4), value_nll_weight=1.0)  # one step: measured before it
    for _ in range(4):
        last = update_policy(policy, optimizer, traj, everything, training_batch_size=4, beta=0.0,
                             rewards=torch.zeros(4), value_nll_weight=1.0)
    assert first.value_nll == pytest.approx(float(nll.mean()), abs=1e-4)
    assert last.value_nll < first.value_nll - 0.05
    spec = update_policy(policy, optimizer, traj, everything, training_batch_size=2)
    assert spec.value_nll is None  # off by default: SPEC's loss


# -- kl_reference ----------------------------------------------------------------------------------------
def test_kl_to_the_base_model_is_zero_for_a_zero_adapter_and_grows_with_it():
    cfg = tiny_config()
    model = attach_adapter(tiny_llama(), cfg)
    traj = _rollout(model, cfg)
    everything = torch.ones(4, dtype=torch.bool)
    upd = update_policy(model, make_optimizer(model, cfg), traj, everything, training_batch_size=4,
                        kl_reference="base")
    assert upd.kl < 1e-8
    from .conftest import randomize_adapter

    randomize_adapter(model)  # the policy now differs from the base model, and from the batch's policy
    base = update_policy(model, make_optimizer(model, cfg), traj, everything, training_batch_size=4,
                         kl_reference="base")
    assert base.kl > 1e-3
    with torch.no_grad(), base_model(model):
        ref = query_logits(model, traj.tokens.clone(), traj.query_positions)
    previous = traj.query_logits  # rolled out with a zero adapter: the base model too
    torch.testing.assert_close(ref, previous, rtol=0, atol=1e-4)


# -- reward_baseline and trajectories_per_article ---------------------------------------------------------
def test_advantages_subtract_the_chosen_baseline():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert advantages(r, "none").tolist() == r.tolist()
    assert advantages(r, "running_mean", 1.5).tolist() == [-0.5, 0.5, 1.5, 4.5]
    assert advantages(r, "running_mean").tolist() == r.tolist()
    # K = 2: each row minus its partner; K = 4: minus the mean of the other three
    assert advantages(r, "leave_one_out", per_article=2).tolist() == [-1.0, 1.0, -3.0, 3.0]
    torch.testing.assert_close(advantages(r, "leave_one_out", per_article=4),
                               torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0]))


def test_trajectories_per_article_repeats_each_article_with_one_pool(smol_tokenizer):
    cfg = TrainConfig.from_preset("embedded", generation_batch_size=8, trajectories_per_article=4,
                                  reward_baseline="leave_one_out")
    batch = next(iter_key_value_batches(cfg, smol_tokenizer, None))
    assert batch.article_ids[:4] == [batch.article_ids[0]] * 4 and batch.article_ids[4] != batch.article_ids[0]
    assert torch.equal(batch.pool[0], batch.pool[3]) and torch.equal(batch.key_tokens[0], batch.key_tokens[3])
    assert batch.position.index >= 2  # two articles consumed, not eight
    single = next(iter_pair_batches([({"id": "a", "title": "a"}, torch.arange(cfg.min_article_tokens))] * 8, cfg, 8))
    assert single.batch_size == 8  # evaluation's batches are unaffected (per_article defaults to 1)


@pytest.mark.parametrize("bad, match", [
    (dict(reward_baseline="leave_one_out"), "trajectories_per_article"),
    (dict(trajectories_per_article=3), "a divisor of generation_batch_size"),
    (dict(kl_reference="ref"), "kl_reference"),
    (dict(choice_in_loss=2), "choice_in_loss"),
    (dict(value_nll_weight=-1.0), "value_nll_weight"),
    (dict(max_train_articles=-1), "max_train_articles"),
    (dict(skip_train_articles=-1, max_train_articles=8), "skip_train_articles"),
    (dict(skip_train_articles=8), "skip_train_articles"),
    (dict(choice_target_weight=-0.1), "choice_target_weight"),
    (dict(choice_target_temperature=0.0), "choice_target_temperature"),
    (dict(choice_target_steps=0), "choice_target_steps"),
    (dict(choice_target_reach="all"), "choice_target_reach"),
])
def test_bad_lever_values_are_one_line_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_preset("embedded", **bad)


def test_lever_defaults_are_specs():
    cfg = TrainConfig()
    assert (cfg.similarity_layer, cfg.choice_in_loss, cfg.value_nll_weight, cfg.kl_reference, cfg.reward_baseline,
            cfg.trajectories_per_article, cfg.max_train_articles) == (-1, 0, 0.0, "previous", "none", 1, 0)


# -- the overfit check ------------------------------------------------------------------------------------
def test_max_train_articles_cycles_the_first_n_and_resumes_in_the_cycle(smol_tokenizer):
    cfg = TrainConfig.from_preset("embedded", generation_batch_size=3, training_batch_size=1, max_train_articles=4)
    batches = list(itertools.islice(iter_key_value_batches(cfg, smol_tokenizer, None), 4))
    ids = [i for b in batches for i in b.article_ids]
    assert len(set(ids)) == 4 and ids[4:8] == ids[:4] and ids[8:12] == ids[:4]
    resumed = next(iter_key_value_batches(cfg, smol_tokenizer, None, start=batches[1].position))
    assert resumed.article_ids == batches[2].article_ids
    with pytest.raises(ValueError, match="max_train_articles=100000"):
        next(iter_key_value_batches(cfg.replace(max_train_articles=100_000), smol_tokenizer, None))


def test_skip_train_articles_cycles_the_next_n(smol_tokenizer):
    """The overfit check on other articles: skipping 2 cycles articles 3-6 of the same first-pass order."""
    cfg = TrainConfig.from_preset("embedded", generation_batch_size=3, training_batch_size=1, max_train_articles=6)
    first = [i for b in itertools.islice(iter_key_value_batches(cfg, smol_tokenizer, None), 2) for i in b.article_ids]
    skipped = cfg.replace(max_train_articles=4, skip_train_articles=2)
    ids = [i for b in itertools.islice(iter_key_value_batches(skipped, smol_tokenizer, None), 4) for i in b.article_ids]
    assert ids[:4] == first[2:6] and ids[4:8] == ids[:4]
    with pytest.raises(ValueError, match="skip_train_articles=100000"):
        next(iter_key_value_batches(cfg.replace(skip_train_articles=100_000), smol_tokenizer, None))


def test_learning_figure_compares_the_first_and_last_windows():
    rising = [0.0, 0.1] * 10 + [1.0, 1.1] * 10
    fig = learning_figure(rising, window=20)
    assert fig["difference"] == pytest.approx(1.0) and fig["z"] > 2
    assert learning_figure(rising[::-1], window=20)["z"] < -2
    assert learning_figure([None] + rising[1:], window=20)["first_mean"] == pytest.approx(0.1 * 10 / 19)
    with pytest.raises(ValueError, match="too few"):
        learning_figure(rising[:30], window=20)


def test_trajectory_records_carry_the_reward_split_and_the_candidates_for_the_browser(policy, smol_tokenizer):
    import matplotlib.pyplot as plt

    from attnrl_core.rundir import _small, format_step, trajectory_records
    from attnrl_core.viz import plot_step_choice

    traj = _choice_rollout(policy, tiny_config(num_kv_pairs=8))
    records = trajectory_records(traj, smol_tokenizer, 1, torch.zeros(4, dtype=torch.bool))
    cand = traj.candidate_rewards
    for b, record in enumerate(records):
        for t, step in enumerate(record["steps"]):
            assert step["base_same_logprob"] == pytest.approx(traj.base_same_logprob[b, t].item())
            left = traj.available[b, t].tolist()
            assert [r is not None for r in step["candidate_rewards"]] == left
            assert [r for r in step["candidate_rewards"] if r is not None] == pytest.approx(
                cand[b, t][traj.available[b, t]].tolist())
    step = records[0]["steps"][1]
    text = format_step(records[0], 1)
    adapter = step["policy_logprob"] - step["base_same_logprob"]
    query = step["base_same_logprob"] - step["base_logprob"]
    assert adapter + query == pytest.approx(step["reward"], abs=1e-5)
    assert f"adapter {_small(adapter)} + query {_small(query)}" in text and f"chose pair {step['pair']}" in text
    # an adapter a few updates old moves the log-prob by ~1e-5: shown as such, not as +0.0000 (issue 40)
    assert (_small(3.2e-5), _small(-0.01234), _small(0.0)) == ("+3.2e-05", "-0.0123", "+0.0000")
    assert text.count("[step ") == 1  # the context holds the steps before this one
    assert len(plot_step_choice(records[0], 1).axes) == 2
    plain = trajectory_records(_rollout(policy, tiny_config(num_kv_pairs=8)), smol_tokenizer, 1,
                               torch.zeros(4, dtype=torch.bool))
    assert "candidate_rewards" not in plain[0]["steps"][0] and len(plot_step_choice(plain[0], 0).axes) == 1
    plt.close("all")
