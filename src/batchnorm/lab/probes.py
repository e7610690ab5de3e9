"""Santurkar et al. 2018's measurements (arXiv 1805.11604), taken during a training step.

Both probes look at one training step t on its own batch (x, y), with parameters theta_t before
the step and theta_{t+1} after it, and leave the model exactly as they found it: they evaluate the
network through `torch.func.functional_call` on copies of its buffers, so no running statistic
moves, and a noisy-BN layer keeps the noise it drew for step t.

- Internal covariate shift, their Definition 2.1 (s2.2): for the weight W_i of layer i,
  G_i = dL/dW_i at theta_t, and G'_i = dL/dW_i with layers 1..i-1 already at theta_{t+1} and layers
  i..k still at theta_t: how much the gradient a layer follows changes because the layers below it
  moved. `ics` records ||G_i - G'_i||, ||G_i - G'_i|| / ||G_i|| and cos(G_i, G'_i) for i >= 2 (the
  first layer has nothing below it).
- The landscape along the gradient (s3.1, Fig. 4): with g = dL/dtheta at theta_t and step sizes
  eta in `multipliers` x lr, L(theta_t - eta g) and ||dL/dtheta(theta_t - eta g) - g||. Their
  ranges over eta (eta = 0 included) are the "loss landscape" and the "gradient predictiveness"
  (a small change of the gradient along the step means the gradient predicts the landscape
  ahead), and
  max over eta of ||dL(theta_t - eta g) - g|| / ||eta g|| is the "effective beta-smoothness".

A layer is a hidden block (its linear or convolution and its normalization's parameters) or the
classifier; its weight W_i is the linear's or convolution's weight.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def layers(model: nn.Sequential) -> list[list[str]]:
    """The parameter names of each layer, in order: a linear/conv starts a new layer, every other
    module's parameters (a normalization's weight and bias) join the layer above them."""
    groups: list[list[str]] = []
    for name, module in model.named_children():
        own = [f"{name}.{p}" for p, _ in module.named_parameters()]
        if isinstance(module, LAYER_TYPES):
            groups.append(own)
        elif own:
            groups[-1].extend(own)
    return groups


def _loss(model, params, buffers, x, y):
    # fresh copies of the buffers: the probe's forward passes must not move running statistics
    state = {**params, **{k: b.clone() for k, b in buffers.items()}}
    return nn.functional.cross_entropy(functional_call(model, state, (x,)), y)


def _grads(model, params, buffers, x, y, wrt):
    leaves = {k: v.detach().requires_grad_(k in wrt) for k, v in params.items()}
    loss = _loss(model, leaves, buffers, x, y)
    grads = torch.autograd.grad(loss, [leaves[k] for k in wrt])
    return loss.detach(), dict(zip(wrt, grads))


def ics(model: nn.Sequential, before: dict, after: dict, x, y) -> list[dict]:
    """Definition 2.1 for every layer but the first; `before`/`after`: parameters at theta_t and
    theta_{t+1} (name -> tensor)."""
    buffers = dict(model.named_buffers())
    groups = layers(model)
    out = []
    for i in range(1, len(groups)):
        weight = groups[i][0]
        _, g = _grads(model, before, buffers, x, y, [weight])
        moved = set(n for group in groups[:i] for n in group)
        mixed = {k: after[k] if k in moved else v for k, v in before.items()}
        _, g2 = _grads(model, mixed, buffers, x, y, [weight])
        a, b = g[weight].flatten(), g2[weight].flatten()
        diff = float((a - b).norm())
        out.append({"layer": i + 1, "l2": diff, "relative": diff / max(float(a.norm()), 1e-30),
                    "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0))})
    return out


def landscape(model: nn.Sequential, params: dict, x, y, lr: float,
              multipliers: list[float]) -> dict:
    """The loss and the gradient change along -g at step sizes multipliers x lr (module
    docstring); `params`: theta_t (name -> tensor)."""
    buffers = dict(model.named_buffers())
    names = list(params)
    loss0, g = _grads(model, params, buffers, x, y, names)
    flat_g = torch.cat([g[k].flatten() for k in names])
    # eta = 0 belongs to both ranges: the loss at theta_t and a gradient change of 0
    losses, changes, betas = [float(loss0)], [0.0], []
    for m in multipliers:
        eta = m * lr
        moved = {k: params[k] - eta * g[k] for k in names}
        loss, g2 = _grads(model, moved, buffers, x, y, names)
        change = float((torch.cat([g2[k].flatten() for k in names]) - flat_g).norm())
        losses.append(float(loss))
        changes.append(change)
        betas.append(change / max(eta * float(flat_g.norm()), 1e-30))
    return {"loss_min": min(losses), "loss_max": max(losses),
            "loss_range": max(losses) - min(losses), "grad_change_range": max(changes),
            "beta": max(betas)}
