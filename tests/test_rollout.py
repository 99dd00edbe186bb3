import torch
import torch.nn.functional as F
from transformers import DynamicCache

from attnrl_core.naive import _naive_value_logprob  # mean log-prob of the last Tv tokens, re-encoding all
from attnrl_core.model import GQA_SDPA, base_model, head_geometry
from attnrl_core.decoding import BufferedCache, sample_from_logits, sample_tokens
from attnrl_core.rollout import calculate_reward, initial_context, rollout

from .conftest import SEP, VOCAB, make_batch, tiny_config, tiny_llama


def _run(policy, greedy=False, seed=0, oracle=False, **cfg_overrides):
    cfg = tiny_config(**cfg_overrides)
    batch = make_batch(policy, cfg, seed)
    torch.manual_seed(seed)
    traj = rollout(policy, batch, SEP, head_geometry(policy), tokens_per_query=cfg.tokens_per_query, greedy=greedy,
                   oracle=oracle)
    return cfg, batch, traj


def test_shapes_and_lockstep_lengths(policy):
    cfg, batch, traj = _run(policy)
    B, P = cfg.generation_batch_size, cfg.pool_size
    L0 = 1 + len(SEP.query) + cfg.tokens_per_key + len(SEP.response) + cfg.tokens_per_value
    step_len = len(SEP.query) + cfg.tokens_per_query + len(SEP.response) + cfg.tokens_per_value
    assert traj.num_steps == P == 3  # ceil(0.5 * 6)
    assert traj.tokens.shape == (B, L0 + P * step_len)
    assert traj.rewards.shape == traj.choices.shape == traj.choice_probs.shape == (B, P)
    assert traj.avg_reward.shape == (B,)
    assert traj.queries.shape == traj.counterfactuals.shape == (B, P, cfg.tokens_per_query)
    assert traj.probabilities.shape == (B, P, cfg.num_kv_pairs)
    torch.testing.assert_close(traj.probabilities.sum(-1), torch.ones(B, P))


def test_each_pool_pair_used_exactly_once(policy):
    cfg, batch, traj = _run(policy, num_kv_pairs=8, subset_fraction=0.25)
    chosen = traj.choices  # [B, P]
    assert chosen.shape[1] == 2  # ceil(0.25 * 8)
    for b in range(cfg.generation_batch_size):
        assert sorted(chosen[b].tolist()) == sorted(batch.pool[b].tolist())
    for t in range(traj.num_steps):  # probabilities only on pairs still in the pool
        for b in range(cfg.generation_batch_size):
            remaining = set(batch.pool[b].tolist()) - set(chosen[b, :t].tolist())
            support = set(torch.nonzero(traj.probabilities[b, t]).flatten().tolist())
            assert support <= remaining
            assert torch.isclose(traj.choice_probs[b, t], traj.probabilities[b, t, chosen[b, t]])


def test_context_is_concatenation_of_separators_and_chunks(policy):
    cfg, batch, traj = _run(policy)
    rows = torch.arange(cfg.generation_batch_size)
    B = cfg.generation_batch_size
    expected = [initial_context(batch, SEP, torch.device("cpu"))]
    for t in range(traj.num_steps):
        expected += [SEP.query.expand(B, -1), traj.queries[:, t], SEP.response.expand(B, -1),
                     batch.value_tokens[rows, traj.choices[:, t]]]
    assert torch.equal(traj.tokens, torch.cat(expected, dim=1))
    assert torch.equal(traj.tokens[:, traj.query_positions], traj.query_tokens)


def test_cached_logprobs_equal_re_encoding(policy):
    cfg, batch, traj = _run(policy)
    Tv, rows = cfg.tokens_per_value, torch.arange(cfg.generation_batch_size)
    with torch.no_grad():
        for t in range(traj.num_steps):
            end = traj.initial_length + (t + 1) * traj.step_length
            torch.testing.assert_close(_naive_value_logprob(policy, traj.tokens[:, :end], Tv), traj.policy_logprob[:, t],
                                       rtol=1e-4, atol=1e-4)
            # the counterfactual: the base model after its own query in the same context
            ctx = traj.tokens[:, :end - traj.step_length]
            cf_seq = torch.cat([ctx, SEP.query.expand(len(rows), -1), traj.counterfactuals[:, t],
                                SEP.response.expand(len(rows), -1), batch.value_tokens[rows, traj.choices[:, t]]], dim=1)
            with base_model(policy):
                base = _naive_value_logprob(policy, cf_seq, Tv)
            torch.testing.assert_close(base, traj.base_logprob[:, t], rtol=1e-4, atol=1e-4)
            adapter_on = _naive_value_logprob(policy, cf_seq, Tv)
            assert not torch.allclose(adapter_on, traj.base_logprob[:, t], atol=1e-3)  # so it really was adapter-off


def test_greedy_queries_are_the_policys_argmax(policy):
    """Queries come from the policy (adapter on) at their exact state in the final context."""
    _, _, traj = _run(policy, greedy=True)
    with torch.no_grad():
        logits = policy(input_ids=traj.tokens, logits_to_keep=traj.query_positions - 1).logits
    assert torch.equal(logits.argmax(-1), traj.query_tokens)


def test_calculate_reward_hand_computed():
    policy_lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    base_lp = torch.tensor([[-2.0, -2.0, -2.0], [-1.0, -0.25, -0.25]])
    torch.testing.assert_close(calculate_reward(policy_lp, base_lp), torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(calculate_reward(policy_lp[:, :1], base_lp[:, :1]), torch.tensor([1.0, 0.5]))


def test_rewards_are_policy_minus_base(policy):
    _, _, traj = _run(policy)
    torch.testing.assert_close(traj.rewards, traj.policy_logprob - traj.base_logprob)
    torch.testing.assert_close(traj.avg_reward, traj.rewards.mean(1))


def test_sample_from_logits_follows_the_tempered_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")], [0.0, 0.0, 3.0, 0.0, 0.0]])
    n, temperature = 20_000, 0.7
    draws = sample_from_logits(logits.repeat_interleave(n, dim=0), temperature).view(2, n)  # [2, n]
    assert draws.dtype == torch.long and int(draws.max()) < 5
    freq = F.one_hot(draws, 5).float().mean(dim=1)  # [2, 5]
    torch.testing.assert_close(freq, F.softmax(logits / temperature, dim=-1), rtol=0, atol=0.015)
    assert not (draws[0] == 4).any()  # a token of probability 0 is never drawn


def test_kept_sampling_logits_are_written_in_place_into_one_buffer(policy):
    """sample_tokens writes the kept rows' logits into the buffer it is given (the same numbers as into its own),
    and a rollout's query_logits is one [B, P*Tq, V] buffer of its own: no concatenation of per-step copies, no
    view keeping a larger tensor alive."""
    prompt = torch.randint(10, VOCAB, (4, 5))
    buffer = torch.full((2, 3, VOCAB), float("nan"))
    with torch.no_grad():
        results = []
        for out in (None, buffer):
            cache = DynamicCache(config=policy.config)
            results.append(sample_tokens(policy, cache, prompt, 3, 1.0, greedy=True, keep_logits=2, logits_out=out))
    (tokens, own), (tokens2, given) = results
    assert torch.equal(tokens, tokens2) and torch.equal(own, given) and not given.isnan().any()
    assert given is buffer  # written in place, not copied
    cfg, _, traj = _run(policy, num_kv_pairs=8)
    B, P, Tq = traj.queries.shape
    q = traj.query_logits
    assert q.shape == (B, P * Tq, VOCAB) and q.is_contiguous()
    assert q.untyped_storage().nbytes() == q.numel() * q.element_size()


def test_buffered_cache_rows_are_written_in_place():
    """Rows of a BufferedCache rolled back and re-read through `rows` hold what a fresh cache would."""
    model = tiny_llama()
    torch.manual_seed(0)
    first, second, other = torch.randint(0, 300, (4, 7)), torch.randint(0, 300, (4, 3)), torch.randint(0, 300, (2, 3))
    with torch.no_grad():
        cache = BufferedCache(model.config, 10)
        model(input_ids=first, cache=cache)
        model(input_ids=second, cache=cache)
        model(input_ids=other, cache=cache.rows(slice(2, 4), 7))  # rows 2-3 read `other` instead
        assert cache.get_seq_length() == 10
        expected = DynamicCache(config=model.config)
        model(input_ids=torch.cat([first, torch.cat([second[:2], other])], dim=1), cache=expected)
    for got, want in zip(cache.layers, expected.layers):
        torch.testing.assert_close(got.keys, want.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.values, want.values, rtol=1e-5, atol=1e-5)


def test_gqa_attention_reads_onto_a_cache_like_sdpa_without_repeating_heads(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    repeats = []
    repeat_kv = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda x, n: repeats.append(n) or repeat_kv(x, n))
    model = tiny_llama()
    ids = torch.randint(10, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for impl in ("sdpa", GQA_SDPA):
        model.set_attn_implementation(impl)
        repeats.clear()
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :7], cache=cache, use_cache=True)
        logits[impl] = model(input_ids=ids[:, 7:], cache=cache, use_cache=True).logits  # a masked read
        assert bool(repeats) == (impl == "sdpa"), (impl, repeats)  # GQA: the kernel takes the 2 KV heads as they are
    torch.testing.assert_close(logits[GQA_SDPA], logits["sdpa"])


def test_scoring_a_bf16_model_keeps_float32_logits():
    """In bf16 the LM head runs in float32 on the bf16 hidden state: the value log-probs equal those of an
    exact float32 head to 1e-5, where logits rounded to bf16 (spacing 0.125 above 16) miss by > 1e-2."""
    import torch.nn.functional as F

    from attnrl_core.decoding import score_continuation
    from attnrl_core.model import Float32Head, float32_head

    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(60)  # logits of tens, as a trained model's are
    model = float32_head(model.to(torch.bfloat16))
    assert isinstance(model.lm_head, Float32Head)
    ids = torch.randint(10, VOCAB, (3, 14), generator=torch.Generator().manual_seed(0))
    prefix, target = ids[:, :8], ids[:, 8:]
    seen = {}
    model.lm_head.register_forward_hook(lambda m, inputs, out: seen.update(hidden=inputs[0]))
    with torch.no_grad():
        got = score_continuation(model, DynamicCache(config=model.config), prefix, target)
    assert seen["hidden"].dtype == torch.bfloat16
    exact = F.linear(seen["hidden"].float(), model.lm_head.weight_fp32)  # [3, 6, V] at the scored positions
    for logits, close in ((exact, True), (exact.bfloat16().float(), False)):
        want = F.log_softmax(logits, -1).gather(-1, target[..., None]).squeeze(-1)
        assert torch.allclose(got, want, atol=1e-5, rtol=0) == close, (got - want).abs().max()
    assert (got - F.log_softmax(exact.bfloat16().float(), -1).gather(-1, target[..., None]).squeeze(-1)).abs().max() > 1e-2


def test_oracle_scores_every_pair_left_as_re_encoding_would(policy):
    """At each step the oracle's reward for every pair still in the pool equals re-encoding the whole
    context with that pair's value (policy after its query minus base after its counterfactual), and so
    does its policy term (`candidate_logprobs`); the chosen pair's are the rollout's reward and
    policy_logprob; pairs not available are NaN."""
    cfg, batch, traj = _run(policy, num_kv_pairs=8, subset_fraction=0.5, oracle=True)
    B, P, N = traj.probabilities.shape
    cand, rows, Tv = traj.candidate_rewards, torch.arange(B), cfg.tokens_per_value
    torch.testing.assert_close(cand.gather(2, traj.choices[..., None]).squeeze(-1), traj.rewards, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(traj.candidate_logprobs.gather(2, traj.choices[..., None]).squeeze(-1),
                               traj.policy_logprob, rtol=1e-4, atol=1e-4)
    assert torch.equal(traj.candidate_logprobs.isnan(), cand.isnan())
    q, r = SEP.query.expand(B, -1), SEP.response.expand(B, -1)
    with torch.no_grad():
        for t in range(P):
            left = set(range(N))
            available = torch.zeros(B, N, dtype=torch.bool)
            available[rows[:, None], batch.pool] = True
            available[rows[:, None], traj.choices[:, :t]] = False
            assert torch.equal(~torch.isnan(cand[:, t]), available)
            ctx = traj.tokens[:, :traj.initial_length + t * traj.step_length]
            for n in left:
                value = batch.value_tokens[:, n]
                policy_lp = _naive_value_logprob(policy, torch.cat([ctx, q, traj.queries[:, t], r, value], 1), Tv)
                with base_model(policy):
                    base_lp = _naive_value_logprob(policy, torch.cat([ctx, q, traj.counterfactuals[:, t], r, value], 1), Tv)
                ok = available[:, n]
                torch.testing.assert_close(cand[ok, t, n], (policy_lp - base_lp)[ok], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(traj.candidate_logprobs[ok, t, n], policy_lp[ok], rtol=1e-4, atol=1e-4)


def test_a_seeded_generator_decides_every_draw_and_leaves_the_global_one_alone(policy):
    cfg = tiny_config()
    batch = make_batch(policy, cfg)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    runs = [rollout(policy, batch, SEP, head_geometry(policy), tokens_per_query=cfg.tokens_per_query,
                    generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(runs[0].queries, runs[1].queries) and torch.equal(runs[0].choices, runs[1].choices)


def test_calculate_reward_averages_k_counterfactual_blocks():
    policy_lp = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]])
    base_lp = torch.tensor([[-2.0, -2.0], [-1.0, -1.0], [-4.0, -4.0], [-3.0, -3.0]])  # block 0 then block 1
    torch.testing.assert_close(calculate_reward(policy_lp, base_lp), torch.tensor([2.0, 0.0]))


def test_k_counterfactual_queries_average_the_base_models_value_logprob(policy, monkeypatch):
    """counterfactual_samples 2: every step's sampling pass writes the policy's queries and two blocks of the base
    model's; the reward's base term is the mean of the base model's value log-prob after each (as re-encoding the
    context with that query gives), the oracle's candidate reward of the chosen pair is the reward, and the
    base model's rows stay copies of the policy's context (the next step's counterfactuals read it)."""
    import attnrl_core.rollout as rollout_module

    captured, real = [], rollout_module.sample_tokens
    monkeypatch.setattr(rollout_module, "sample_tokens",
                        lambda *a, **k: captured.append(real(*a, **k)) or captured[-1])
    cfg = tiny_config(num_kv_pairs=8, subset_fraction=0.5)
    batch = make_batch(policy, cfg)
    torch.manual_seed(0)
    traj = rollout(policy, batch, SEP, head_geometry(policy), tokens_per_query=cfg.tokens_per_query, oracle=True,
                   counterfactual_samples=2)
    B, P, Tv = traj.batch_size, traj.num_steps, cfg.tokens_per_value
    assert len(captured) == P
    q, r = SEP.query.expand(B, -1), SEP.response.expand(B, -1)
    different = False
    with torch.no_grad():
        for t in range(P):
            queries = captured[t][0]  # [3B, Tq]
            assert queries.shape == (3 * B, cfg.tokens_per_query)
            assert torch.equal(queries[:B], traj.queries[:, t]) and torch.equal(queries[B:2 * B], traj.counterfactuals[:, t])
            different |= not torch.equal(queries[B:2 * B], queries[2 * B:])
            ctx = traj.tokens[:, :traj.initial_length + t * traj.step_length]
            value = batch.value_tokens[torch.arange(B), traj.choices[:, t]]
            with base_model(policy):
                base = torch.stack([_naive_value_logprob(policy, torch.cat([ctx, q, cf, r, value], 1), Tv)
                                    for cf in (queries[B:2 * B], queries[2 * B:])]).mean(0)
            torch.testing.assert_close(traj.base_logprob[:, t], base, rtol=1e-4, atol=1e-4)
    assert different  # two draws, not one repeated
    torch.testing.assert_close(traj.rewards, traj.policy_logprob - traj.base_logprob)
    torch.testing.assert_close(traj.candidate_rewards.gather(2, traj.choices[..., None]).squeeze(-1), traj.rewards,
                               rtol=1e-4, atol=1e-4)

