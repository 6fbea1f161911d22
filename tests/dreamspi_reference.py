"""Reference minibatch losses of DreamSPI's two steps, written apart from dreamspi_atari.py's training loop (which
computes the real-data loss inline, as CleanRL's ppo_atari.py does, and the imagination loss in imagination_loss):
pinned to the official JAX code by tests/test_parity_official.py (with the done head silenced, the real-data loss is
the official DeepSPI loss), and compared with what the real loop trains on by tests/test_dreamspi.py.

They use only the script's modules (encoder, torso, heads, reward, transition and done models); the losses, the
utility, the clipped surrogates and the value losses are written out here."""

import torch
import torch.nn.functional as F
from deepspi_reference import ppo_terms


def real_step_loss(
    agent, args, obs, next_obs, actions, logprobs, advantages, returns, rewards, resets, next_dones, eps=None, values=None
):
    """The real-data step: the DeepSPI loss (paper Sec. 4; official deep_spi.py _ppo_loss) clipped with wm_clip_coef,
    whose utility also holds the done loss Huber(sigmoid(D(z')) + 1e-8, next done) (official dream_spi.py)."""
    z = agent.encode(obs)
    # a reset transition targets phi(s) instead of phi(s') (official L719-721); phi(s') is not detached
    z_target = torch.where(resets.view(-1, 1, 1, 1).bool(), z, agent.encode(next_obs))
    reward_pred = agent.reward_model(z, actions)
    sample, mixture_logits, _, _ = agent.transition_model(z, actions, eps)
    reward_loss = F.smooth_l1_loss(reward_pred, rewards, reduction="none")
    transition_loss = F.smooth_l1_loss(sample, z_target, reduction="none").sum((1, 2, 3))
    done_prob = torch.sigmoid(agent.done_predictor(z_target)) + 1e-8
    done_loss = F.smooth_l1_loss(done_prob, next_dones, reduction="none")
    aux = args.reward_loss_coef * (reward_loss + done_loss) + args.transition_loss_coef * transition_loss
    loss, out = ppo_terms(agent, args, z, actions, logprobs, advantages, returns, values, args.wm_clip_coef, aux)
    out.update(z_target=z_target, reward_pred=reward_pred, transition_sample=sample, mixture_logits=mixture_logits)
    out.update(reward_loss_per_sample=reward_loss, transition_loss_per_sample=transition_loss, done_prob=done_prob)
    out.update(done_loss_per_sample=done_loss, reward_loss=reward_loss.mean(), transition_loss=transition_loss.mean())
    out.update(done_loss=done_loss.mean())
    return loss, out


def imagination_step_loss(agent, args, z, actions, logprobs, advantages, returns, values=None):
    """The imagination step: the plain clipped PPO loss (clip_coef, no world-model term) on imagined latents."""
    return ppo_terms(agent, args, z, actions, logprobs, advantages, returns, values, args.clip_coef)
