"""Readouts of the similarity and the `retrieval` command (self-retrieval of a pair from its own key)."""

import json

import pytest
import torch

from attnrl_core import retrieval
from attnrl_core.__main__ import main
from attnrl_core.config import TrainConfig
from attnrl_core.embeddings import READOUTS, compute_similarity, head_probabilities, query_embeddings, readout
from attnrl_core.model import attach_adapter, attention_layer

from .conftest import tiny_config, tiny_llama


def _late_interaction_reference(q, k, Hq, Hkv, temperature):
    """Per query head h, KV group h // (Hq/Hkv): for each query token the best key token, averaged; loops."""
    B, Tq, _ = q.shape
    K, Tk = k.shape[1], k.shape[2]
    D = q.shape[-1] // Hq
    probs = torch.zeros(B, Hq, K)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            scores = torch.zeros(K)
            for key in range(K):
                dots = torch.tensor([[float(q[b, i, h * D:(h + 1) * D] @ k[b, key, j, g * D:(g + 1) * D])
                                      for j in range(Tk)] for i in range(Tq)])
                scores[key] = dots.max(dim=1).values.mean() * temperature / D ** 0.5
            probs[b, h] = torch.softmax(scores, dim=0)
    return probs


def test_late_interaction_matches_a_loop_reference():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 6 * 4), torch.randn(2, 5, 4, 2 * 4)
    assert torch.allclose(head_probabilities(q, k, 6, 2, temperature=2.0), _late_interaction_reference(q, k, 6, 2, 2.0),
                          atol=1e-5)


@pytest.mark.parametrize("how", READOUTS)
def test_every_readout_keeps_the_gqa_head_mapping(how):
    """Head h reads KV group h // 3 whatever the readout: a query that matches key 0 through heads 3-5 (group 1)
    only, and key 1 through group 0 only with heads that are zero."""
    Hq, Hkv, D, T = 6, 2, 4, 3
    q_tokens = torch.zeros(1, T, Hq * D)
    q_tokens[0, :, 3 * D:6 * D] = 10.0  # heads 3, 4, 5 -> group 1
    k_tokens = torch.zeros(2, T, Hkv * D)  # two keys' tokens
    k_tokens[0, :, 1 * D:2 * D] = 1.0  # key 0 matches through group 1
    k_tokens[1, :, 0 * D:1 * D] = 1.0  # key 1 matches through group 0 only
    q, k = readout(q_tokens, how), readout(k_tokens, how)[None]
    per_head = head_probabilities(q, k, Hq, Hkv)[0]  # [Hq, K]
    assert torch.allclose(per_head[:3], torch.full((3, 2), 0.5))
    assert torch.all(per_head[3:, 0] > 0.99)


def test_readouts_of_a_query():
    model = attach_adapter(tiny_llama(), tiny_config())
    tokens = torch.randint(10, 300, (3, 5))
    q_proj = attention_layer(model, -1).q_proj
    outputs = {}
    handle = q_proj.register_forward_hook(lambda _m, _i, out: outputs.setdefault("q", out))
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    handle.remove()
    with torch.no_grad():
        assert torch.allclose(query_embeddings(model, tokens), outputs["q"].mean(dim=1), atol=1e-6)
        assert torch.allclose(query_embeddings(model, tokens, how="last"), outputs["q"][:, -1], atol=1e-6)
        assert query_embeddings(model, tokens, how="max").shape == (3, 5, 6 * 16)
    with pytest.raises(ValueError, match="similarity_readout"):
        readout(outputs["q"], "median")


def test_pooled_readouts_give_spec_numbers():
    """The pooled path is the one SPEC's runs used: the same numbers as before the late-interaction branch."""
    torch.manual_seed(1)
    q, k = torch.randn(4, 6 * 4), torch.randn(4, 5, 2 * 4)
    scores = torch.einsum("bhgd,bkhd->bhgk", q.view(4, 2, 3, 4), k.view(4, 5, 2, 4)) * (3.0 / 2)
    assert torch.equal(compute_similarity(q, k, 6, 2, 3.0), torch.softmax(scores, -1).reshape(4, 6, 5).mean(1))


def _tied_model(smol_vocab: int):
    """A tiny model whose first layer's q_proj is its k_proj repeated for each query head of a KV group: at layer 0
    a token's query and key projections are then the same vector, so a query equal to a key's text scores that key
    by its squared norm and any other by a smaller dot product (distinct texts)."""
    model = tiny_llama(vocab_size=smol_vocab)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        k = attn.k_proj.weight.view(2, 16, 96)  # [Hkv, D, hidden]
        attn.q_proj.weight.copy_(k.repeat_interleave(3, dim=0).reshape(6 * 16, 96))  # head h <- group h // 3
    return attach_adapter(model, tiny_config())


@pytest.mark.parametrize("how", READOUTS)
def test_retrieval_command_finds_a_key_written_as_the_query(monkeypatch, capsys, smol_tokenizer, how):
    """On held-out articles (real text, the real tokenizer), a query equal to a key's text retrieves that key when
    the similarity can express it (the tied layer 0), and not when it cannot (another layer's random weights)."""
    model = _tied_model(len(smol_tokenizer))
    monkeypatch.setattr(retrieval, "load_for_retrieval", lambda cfg, run_dir=None: (model, smol_tokenizer))
    flags = ["retrieval", "--num_kv_pairs", "6", "--tokens_per_key", "5", "--tokens_per_value", "4",
             "--tokens_per_query", "5", "--num_articles", "3", "--windows_per_article", "2", "--temperature", "8",
             "--similarity_readout", how, "--json"]
    results = {}
    for layer in (0, 1):
        assert main(flags + ["--similarity_layer", str(layer)]) == 0
        results[layer] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tied, untied = results[0], results[1]
    assert tied["candidates"] == 5 and tied["articles"] == 3 and tied["queries"] == 5 * tied["units"]
    # the tiny model's projections are small, so the distribution stays near uniform: the ranking is the point
    assert tied["top1"] >= 0.95 and tied["probability_ratio"] > 1 and tied["entropy"] < 1
    assert untied["top1"] < 0.8, untied  # random q_proj against k_proj: the own key is not special


def test_retrieval_sweep_covers_layers_temperatures_and_readouts(monkeypatch, capsys, smol_tokenizer, tmp_path):
    model = _tied_model(len(smol_tokenizer))
    monkeypatch.setattr(retrieval, "load_for_retrieval", lambda cfg, run_dir=None: (model, smol_tokenizer))
    figure = tmp_path / "sweep.png"
    assert main(["retrieval", "--sweep", "--num_kv_pairs", "6", "--tokens_per_key", "5", "--tokens_per_value", "4",
                 "--tokens_per_query", "5", "--num_articles", "2", "--windows_per_article", "1", "--json",
                 "--figure", str(figure)]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {(r["readout"], r["layer"], r["temperature"]) for r in rows} == \
        {(h, layer, t) for h in READOUTS for layer in (0, 1) for t in retrieval.SWEEP_TEMPERATURES}
    assert figure.is_file()


def test_retrieval_refuses_a_query_length_other_than_the_keys(smol_tokenizer):
    cfg = TrainConfig.from_preset("embedded", tokens_per_query=7)
    with pytest.raises(ValueError, match="tokens_per_key"):
        retrieval.heldout_keys(cfg, smol_tokenizer)


# -- the readouts in a run: rollout, choice_in_loss and the selection objective read the same distribution ------
@pytest.mark.parametrize("how", ["last", "max"])
def test_a_readout_runs_through_rollout_and_both_selection_gradients(policy, how):
    from attnrl_core.data import add_embeddings
    from attnrl_core.embeddings import choice_logprob, key_embedding_fn
    from attnrl_core.model import head_geometry
    from attnrl_core.rollout import rollout
    from attnrl_core.training import choice_target_options, choice_target_step, make_optimizer

    from .conftest import SEP, make_batch

    cfg = tiny_config(num_kv_pairs=8, similarity_readout=how, temperature=3.0, choice_target_weight=1.0,
                      choice_target_steps=3, learning_rate=1e-2)
    batch = make_batch(policy, cfg)
    batch.key_embeddings = None
    batch = next(add_embeddings([batch], key_embedding_fn(policy, torch.device("cpu"), how=how)))
    assert batch.key_embeddings.ndim == (4 if how == "max" else 3)
    torch.manual_seed(0)
    traj = rollout(policy, batch, SEP, head_geometry(policy), tokens_per_query=cfg.tokens_per_query,
                   similarity_temperature=3.0, similarity_readout=how, oracle=True)
    step = 1  # the rollout drew step 1's pair from the readout's similarity over the pairs then left
    q = query_embeddings(policy, traj.queries[:, step], how=how)
    expected = compute_similarity(q, batch.key_embeddings, 6, 2, 3.0, traj.available[:, step])
    torch.testing.assert_close(traj.probabilities[:, step], expected, rtol=0, atol=1e-6)
    logp = choice_logprob(policy, traj.queries.clone(), batch.key_embeddings.clone(), traj.available.clone(),
                          traj.choices.clone(), 3.0, how=how)
    torch.testing.assert_close(logp, traj.choice_probs.log(), rtol=0, atol=1e-5)
    result = choice_target_step(policy, make_optimizer(policy, cfg), traj, training_batch_size=4,
                                **choice_target_options(cfg))
    assert not result.skipped and result.kl_last < result.kl  # the objective fits through this readout


def test_readout_and_training_oracle_are_validated_and_default_to_spec():
    assert (TrainConfig().similarity_readout, TrainConfig().training_oracle) == ("mean", 0)
    with pytest.raises(ValueError, match="similarity_readout"):
        TrainConfig.from_preset("embedded", similarity_readout="median")
    with pytest.raises(ValueError, match="training_oracle"):
        TrainConfig.from_preset("embedded", training_oracle=2)


# -- hindsight on the query ---------------------------------------------------------------------------------------
def _naive_hindsight_nll(model, traj, targets):
    """Per trajectory, the sum over steps of the mean NLL of targets[:, t] written after step t's ` Query:`, one
    sequence at a time."""
    out = torch.zeros(traj.batch_size)
    for b in range(traj.batch_size):
        for t in range(traj.num_steps):
            start = traj.initial_length + t * traj.step_length + traj.query_offset
            ids = torch.cat([traj.tokens[b, :start], targets[b, t]])[None]
            logp = torch.log_softmax(model(input_ids=ids).logits[0, start - 1:-1].float(), -1)
            out[b] -= logp.gather(1, targets[b, t, :, None]).mean()
    return out


def test_hindsight_targets_the_best_scored_pairs_key_and_its_step_lowers_that_nll(policy):
    from attnrl_core.model import head_geometry
    from attnrl_core.rollout import rollout
    from attnrl_core.training import hindsight_options, hindsight_step, hindsight_targets, make_optimizer

    from .conftest import SEP, make_batch

    cfg = tiny_config(num_kv_pairs=8, tokens_per_key=3, hindsight_weight=1.0, learning_rate=1e-2)
    batch = make_batch(policy, cfg)
    torch.manual_seed(0)
    traj = rollout(policy, batch, SEP, head_geometry(policy), tokens_per_query=cfg.tokens_per_query, oracle=True)
    targets = hindsight_targets(traj)
    cand = traj.candidate_rewards
    for b in range(traj.batch_size):
        for t in range(traj.num_steps):
            left = (~cand[b, t].isnan()).nonzero()[:, 0]
            best = left[cand[b, t, left].argmax()]
            assert torch.equal(targets[b, t], batch.key_tokens[b, best])
    policy.eval()  # dropout is 0 in tiny_config: train and eval passes agree
    with torch.no_grad():
        before = _naive_hindsight_nll(policy, traj, targets)
    result = hindsight_step(policy, make_optimizer(policy, cfg), traj, training_batch_size=3, **hindsight_options(cfg))
    assert result.nll == pytest.approx(before.mean().item(), rel=1e-4) and not result.skipped
    with torch.no_grad():
        after = _naive_hindsight_nll(policy, traj, targets)
    assert after.mean() < before.mean()  # the step moved the policy toward writing those keys
    assert hindsight_options(TrainConfig()) is None and TrainConfig().hindsight_weight == 0.0


def test_k_hindsight_steps_are_k_single_steps_on_the_same_targets(policy):
    """`hindsight_steps` K is K single steps on the rollout's fixed targets, each from zeroed gradients (the same
    adapter as K calls of one step on one optimizer), reporting the first step's NLL and gradient norm; and the
    targets' NLL ends lower than one step leaves it."""
    from attnrl_core.model import adapter_parameters, head_geometry
    from attnrl_core.rollout import rollout
    from attnrl_core.training import hindsight_options, hindsight_step, hindsight_targets, make_optimizer

    from .conftest import SEP, make_batch

    cfg = tiny_config(num_kv_pairs=8, tokens_per_key=3, hindsight_weight=1.0, learning_rate=1e-2)
    batch = make_batch(policy, cfg)
    torch.manual_seed(0)
    traj = rollout(policy, batch, SEP, head_geometry(policy), tokens_per_query=cfg.tokens_per_query, oracle=True)
    targets = hindsight_targets(traj)
    start = [p.detach().clone() for p in adapter_parameters(policy)]
    opt = make_optimizer(policy, cfg)
    singles = [hindsight_step(policy, opt, traj, training_batch_size=3, **hindsight_options(cfg)) for _ in range(3)]
    after_singles = [p.detach().clone() for p in adapter_parameters(policy)]
    policy.eval()
    with torch.no_grad():
        after_three_singles = _naive_hindsight_nll(policy, traj, targets).mean().item()
        for p, v in zip(adapter_parameters(policy), start):
            p.copy_(v)
    options = hindsight_options(cfg.replace(hindsight_steps=3))
    assert options["steps"] == 3
    three = hindsight_step(policy, make_optimizer(policy, cfg), traj, training_batch_size=3, **options)
    for p, v in zip(adapter_parameters(policy), after_singles):
        torch.testing.assert_close(p.detach(), v, rtol=0, atol=1e-6)
    assert three.nll == pytest.approx(singles[0].nll, rel=1e-5) and not three.skipped
    assert three.grad_norm == pytest.approx(singles[0].grad_norm, rel=1e-5)
    assert after_three_singles < singles[1].nll < singles[0].nll  # each step lowered the targets' NLL
    assert three.nll_last == pytest.approx(singles[2].nll, rel=1e-5)  # the last pass, before the last step
    assert singles[0].nll_last == singles[0].nll  # one step: the last pass is the first
    with pytest.raises(ValueError, match="hindsight_steps"):
        TrainConfig(hindsight_steps=0)
