"""A reference DeepSPI minibatch loss, written apart from deepspi_atari.py's training loop (which computes the loss
inline, as CleanRL's ppo_atari.py does): pinned to the official JAX code by tests/test_parity_official.py, and compared
with what the real loop trains on (its minibatches, weights, loss and clipped gradients) by tests/test_atari_loop.py.

It uses only the script's modules (encoder, torso, heads, reward and transition models); the losses, the utility, the
clipped surrogate and the value loss are written out here."""

import torch
import torch.nn.functional as F
from torch.distributions.categorical import Categorical


def reference_loss(agent, args, obs, next_obs, actions, logprobs, advantages, returns, rewards, resets, eps=None, values=None):
    """The DeepSPI minibatch loss (paper Sec. 4; official deep_spi.py _ppo_loss) and its parts, as a dict."""
    z, out, aux = agent.encode(obs), {}, None
    if args.reward_loss_coef > 0 or args.transition_loss_coef > 0:
        # a reset transition targets phi(s) instead of phi(s') (official L719-721); phi(s') is not detached
        z_target = torch.where(resets.view(-1, 1, 1, 1).bool(), z, agent.encode(next_obs))
        reward_pred = agent.reward_model(z, actions)
        sample, mixture_logits, _, _ = agent.transition_model(z, actions, eps)
        reward_loss = F.smooth_l1_loss(reward_pred, rewards, reduction="none")
        transition_loss = F.smooth_l1_loss(sample, z_target, reduction="none").sum((1, 2, 3))
        aux = args.reward_loss_coef * reward_loss + args.transition_loss_coef * transition_loss
        out.update(z_target=z_target, reward_pred=reward_pred, transition_sample=sample, mixture_logits=mixture_logits)
        out.update(reward_loss_per_sample=reward_loss, transition_loss_per_sample=transition_loss)
        out.update(reward_loss=reward_loss.mean(), transition_loss=transition_loss.mean())
    loss, ppo = ppo_terms(agent, args, z, actions, logprobs, advantages, returns, values, args.clip_coef, aux)
    return loss, ppo | out


def ppo_terms(agent, args, z, actions, logprobs, advantages, returns, values, clip, aux=None):
    """CleanRL's clipped PPO loss on latents z with clipping coefficient `clip`; aux (per sample) is subtracted from the
    normalised advantage inside the clip (DeepSPI's utility), or added to the loss with args.deep_mdp."""
    hidden = agent.network(z)
    probs = Categorical(logits=agent.actor(hidden).float())
    newlogprob, entropy, newvalue = probs.log_prob(actions), probs.entropy(), agent.critic(hidden).view(-1)
    logratio = newlogprob - logprobs
    ratio = logratio.exp()
    out = {"newlogprob": newlogprob, "entropy": entropy, "newvalue": newvalue, "ratio": ratio, "z": z}
    out["approx_kl"] = ((ratio - 1) - logratio).mean().detach()
    if args.norm_adv:  # the population std, as the official (JAX) code
        advantages = (advantages - advantages.mean()) / (advantages.std(unbiased=False) + 1e-8)
    out["adv_norm"] = advantages
    aux = torch.zeros_like(advantages) if aux is None else aux
    utility = advantages if args.deep_mdp else advantages - aux
    pg_loss = torch.max(-utility * ratio, -utility * ratio.clamp(1 - clip, 1 + clip)).mean()
    if args.clip_vloss:  # CleanRL's clipped value loss, around the rollout's values
        clipped = values + (newvalue - values).clamp(-clip, clip)
        v_loss = 0.5 * torch.max((newvalue - returns) ** 2, (clipped - returns) ** 2).mean()
    else:
        v_loss = 0.5 * ((newvalue - returns) ** 2).mean()
    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + args.vf_coef * v_loss + (aux.mean() if args.deep_mdp else 0.0)
    out.update(utility=utility, pg_loss=pg_loss, v_loss=v_loss, entropy_loss=entropy_loss)
    return loss, out


def minibatch_from_storage(storage, mb_inds, gamma, gae_lambda, resets_at_next):
    """Every input of a minibatch, built from the loop's rollout storage (as tests/recorder.py keeps it: obs and dones
    (T + 1, N, ...), actions, logprobs, rewards and values (T, N), next_value (1, N)) and the minibatch's flat indices,
    without the loop's flattened b_* arrays: flat index i is step i // N of env i % N. The advantages: GAE's recursion
    over the storage, dones[t + 1] cutting the bootstrap after step t, in float32 and CleanRL's order of operations (the
    PPO loss of normalised advantages is near 0, so a float64 GAE would differ from the loop's by more than its size;
    the recursion itself is checked against the explicit float64 sum by test_atari_loop.py's GAE test). A sample's
    reset flag (its world-model target becomes phi(s)) is dones[t + 1] if resets_at_next, else dones[t] (envpool and
    the maze by default, which reset a step late)."""
    rewards = storage["rewards"]
    values = storage["values"]
    dones = storage["dones"]
    steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = 0
    for t in reversed(range(steps)):
        nextnonterminal = 1.0 - dones[t + 1]
        nextvalues = storage["next_value"] if t == steps - 1 else values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
    returns = advantages + values
    mb_inds = torch.as_tensor(mb_inds)
    t = mb_inds // rewards.shape[1]
    e = mb_inds % rewards.shape[1]
    resets = dones[t + 1, e] if resets_at_next else dones[t, e]
    return {
        "obs": storage["obs"][t, e],
        "next_obs": storage["obs"][t + 1, e],
        "actions": storage["actions"][t, e].long(),
        "logprobs": storage["logprobs"][t, e],
        "advantages": advantages[t, e],
        "returns": returns[t, e],
        "values": values[t, e],
        "rewards": rewards[t, e],
        "resets": resets,
        "next_dones": dones[t + 1, e],
    }
