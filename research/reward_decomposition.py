"""Issue 39 (EXPERIMENTS.md §7.1): what in SPEC's reward can the choice of pair move?

At initialisation the policy is the base model, so a step's reward for pair j is L(j | a) - L(j | b): L the
value's mean log-prob after a query, a the policy's query and b the counterfactual, two draws from the same
distribution in the same context. Write L(j | q) = mu + alpha_j + beta_q + gamma_jq (pair, query, interaction):
the reward is beta_a - beta_b + gamma_ja - gamma_jb, and the pair's own difficulty alpha_j cancels exactly. This
script measures it on the untrained embedded model: for `articles` training articles (the overfit check's first
ones, 16 pairs each), every candidate pair's value is scored in the first step's context after 2S sampled
queries (S "policy", S "counterfactual"), after its own key text written as the query, and after other pairs'
keys. It prints:

- the within-step spread of candidate rewards (SD over the pairs of one step) split into what the pair, the
  pair x policy-query and the pair x counterfactual-query terms contribute;
- how often the best pair of a random pool of 4 agrees between two independent (a, b) draws (chance 0.25), and
  with K averaged counterfactuals (`--counterfactual_samples`' target);
- the value's log-prob gain when its own key is the query, and when another pair's key is, over a sampled query.

Usage: python research/reward_decomposition.py [articles [samples]]   (one thread; about a minute an article)
"""
import itertools
import sys

import numpy as np
import torch

from attnrl_core.config import TrainConfig
from attnrl_core.data import encode_separators, iter_key_value_batches
from attnrl_core.model import load_policy
from attnrl_core.naive import _naive_value_logprob
from attnrl_core.rollout import generate_query

num_articles = int(sys.argv[1]) if len(sys.argv) > 1 else 10
samples = int(sys.argv[2]) if len(sys.argv) > 2 else 8
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = TrainConfig.from_preset("embedded", num_kv_pairs=16, max_train_articles=num_articles,
                              generation_batch_size=num_articles)
model, tokenizer = load_policy(cfg)
model.eval()
sep = encode_separators(tokenizer)
batch = next(iter_key_value_batches(cfg, tokenizer, None))
N, Tv = cfg.num_kv_pairs, cfg.tokens_per_value
pairs = torch.arange(1, N)  # the candidates (pair 0 is the in-context example)


@torch.no_grad()
def value_logprobs(article: int, queries: torch.Tensor) -> torch.Tensor:
    """[Q, N-1]: each candidate's value mean log-prob after each query [Q, Tq], in the first step's context."""
    k, v = batch.key_tokens[article], batch.value_tokens[article]
    context = torch.cat([sep.bos, sep.query, k[0], sep.response, v[0], sep.query])
    Q = queries.shape[0]
    seqs = torch.cat([context.expand(Q * len(pairs), -1), queries.repeat_interleave(len(pairs), 0),
                      sep.response.expand(Q * len(pairs), -1), v[pairs].repeat(Q, 1)], dim=1)
    return torch.cat([_naive_value_logprob(model, part, Tv) for part in seqs.split(64)]).view(Q, len(pairs))


results = {"pair_in_L": [], "policy": [], "counterfactual": [], "agree": {1: [], 3: []}, "own": [], "other": []}
rng = np.random.default_rng(0)
for a in range(num_articles):
    rows = batch.rows(a, a + 1)
    sampled = torch.cat([generate_query(model, rows, sep, cfg.tokens_per_query) for _ in range(2 * samples)])
    L = value_logprobs(a, sampled).double().numpy()  # [2S, N-1]
    keys = value_logprobs(a, batch.key_tokens[a, pairs]).double().numpy()  # [N-1 queries (pair i's key), N-1]
    # two-way decomposition of L over (query, pair): pair main effect, query main effect, interaction
    grand = L.mean()
    alpha = L.mean(0) - grand  # [N-1]
    gamma = L - L.mean(1, keepdims=True) - alpha  # [2S, N-1]
    policy_q, cf_q = gamma[:samples], gamma[samples:]
    # what the pair's own difficulty is of L's spread over the pairs after one query (it is 0 of the reward's)
    results["pair_in_L"] += (alpha.var() / (L - L.mean(1, keepdims=True)).var(1)).tolist()
    # within-step spread of rewards over pairs: r_j - mean_j r = (gamma_ja - gamma_jb), alpha cancelling
    for i, j in itertools.product(range(samples), range(samples)):
        results["policy"].append(policy_q[i].var())
        results["counterfactual"].append(cf_q[j].var())
    # the best pair of a pool of 4 in two independent draws of (policy query, K counterfactuals)
    for _ in range(200):
        pool = rng.choice(N - 1, 4, replace=False)
        for K in (1, 3):
            best = []
            for _draw in range(2):
                qa = rng.integers(samples)
                cf = rng.choice(np.arange(samples, 2 * samples), K, replace=False)
                best.append(int(np.argmax(L[qa, pool] - L[cf][:, pool].mean(0))))
            results["agree"][K].append(best[0] == best[1])
    sampled_mean = L.mean(0)  # [N-1] each value's mean log-prob after a sampled query
    own = np.diag(keys) - sampled_mean
    other = (keys.sum(0) - np.diag(keys)) / (N - 2) - sampled_mean
    results["own"] += own.tolist()
    results["other"] += other.tolist()
    print(f"article {a + 1}/{num_articles}: own key {own.mean():+.3f}, other key {other.mean():+.3f}", flush=True)

total = np.mean(results["policy"]) + np.mean(results["counterfactual"])
print(f"\nthe pair's own difficulty is {np.mean(results['pair_in_L']):.1%} of the spread of L(j | q) over a step's pairs "
      f"after one query, and cancels from the reward")
print(f"within-step variance of candidate rewards {total:.4f} (SD {np.sqrt(total):.3f}) over {num_articles} articles, "
      f"{samples} x {samples} (policy, counterfactual) query pairs each (independent draws: no covariance term):")
print(f"  {'pair':>15}:   0.0% (alpha_j cancels)")
for name in ("policy", "counterfactual"):
    print(f"  {name + ' x pair':>22}: {np.mean(results[name]) / total:6.1%}")
for K in (1, 3):
    print(f"best of a pool of 4 agrees between two draws (K = {K} counterfactuals): {np.mean(results['agree'][K]):.2f} "
          f"(chance 0.25)")
for name in ("own", "other"):
    x = np.array(results[name])
    print(f"value log-prob after the {name} key as the query - after a sampled query: {x.mean():+.3f} (SD {x.std():.3f},"
          f" {x.size} pairs)")
