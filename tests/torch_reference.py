"""Torch reference implementations of device optimizer steps, for parity tests.

Readable, not fast (pycma's `purecma` spirit): each function performs one step of the
algorithm with torch ops on named tensors, given the same noise the device drew.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy in float64 (the device accumulates losses in float64)."""
    return torch.nn.functional.cross_entropy(out.double(), y)


def zo_sgd_step(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    z: Mapping[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    lr: float,
    eps: float,
    loss_fn: LossFn = cross_entropy,
) -> tuple[dict[str, torch.Tensor], float, tuple[float, float]]:
    """One MeZO / SPSA step (Malladi et al. 2023) on the parameters named in `z`.

    Args:
        model: torch module (eval mode); parameters not in `params` keep the module's values.
        params: name -> current float32 tensor of every parameter to override.
        z: name -> float32 noise tensor for each trainable parameter (same shape).
        inputs: input batch.
        targets: labels / targets for `loss_fn`.
        lr: learning rate.
        eps: perturbation scale.
        loss_fn: (output, targets) -> scalar loss.
    Returns: (new params for the names in z, projected gradient g, (L+, L-)).
    """
    with torch.no_grad():
        def loss_at(sign: float) -> float:
            cand = dict(params)
            for n, zn in z.items():
                cand[n] = params[n] + sign * eps * zn
            return float(loss_fn(functional_call(model, cand, (inputs,)), targets))

        lp, lm = loss_at(+1.0), loss_at(-1.0)
        g = (lp - lm) / (2.0 * eps)
        new = {n: params[n] - (lr * g) * zn for n, zn in z.items()}
    return new, g, (lp, lm)


def _local_forward(model: nn.Module, layer: Mapping, p: Mapping[str, torch.Tensor],
                   x: torch.Tensor) -> torch.Tensor:
    """One layer (+ its eval batch norm and activation) in torch, from its detached input."""
    f = torch.nn.functional
    w = p[layer["params"]["weight"]] if "weight" in layer["params"] else None
    b = p.get(layer["params"].get("bias", ""))
    if layer["kind"] == "gru":
        gru = model.get_submodule(layer["name"])
        sub = {f"{role}_l0": p[n] for role, n in layer["params"].items()}
        out, _ = functional_call(gru, sub, (x,))
        return out[:, -1]
    groups = layer.get("groups", 1)
    if layer["kind"] == "conv1d":
        z = f.conv1d(x, w, b, stride=layer["stride"], padding=layer["padding"],
                     dilation=layer["dilation"], groups=groups)
    elif layer["kind"] == "conv2d":
        z = f.conv2d(x, w, b, stride=layer["stride"], padding=layer["padding"],
                     dilation=layer["dilation"], groups=groups)
    else:
        z = f.linear(x, w, b)
    bn, ln = layer.get("bn"), layer.get("ln")
    if bn:
        z = f.batch_norm(z, p[bn["running_mean"]], p[bn["running_var"]], p.get(bn.get("weight")),
                         p.get(bn.get("bias")), training=False, eps=bn["eps"])
    if ln:
        z = f.layer_norm(z, z.shape[z.ndim - ln["dims"]:], p.get(ln.get("weight")),
                         p.get(ln.get("bias")), eps=ln["eps"])
    act = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
           "gelu": f.gelu, "gelu_tanh": lambda v: f.gelu(v, approximate="tanh"),
           "silu": f.silu, "relu6": f.relu6, "hardswish": f.hardswish,
           "none": lambda v: v}[layer["activation"]]
    return act(z)


def _post(layer: Mapping, a: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's recorded post ops (pooling, mean, residual add, reshape) by torch's ops;
    `skip` is the (detached) other summand of a residual add."""
    f = torch.nn.functional
    for op in layer.get("post", []):
        if op["op"] == "add":
            a = a + skip
            continue
        if op["op"] in ("maxpool", "avgpool"):
            fn = {("maxpool", 1): f.max_pool1d, ("maxpool", 2): f.max_pool2d,
                  ("avgpool", 1): f.avg_pool1d, ("avgpool", 2): f.avg_pool2d}[
                op["op"], op["dims"]]
            a = fn(a, op["kernel"], op["stride"])
        elif op["op"] == "mean":
            a = a.mean(dim=op["dims"], keepdim=op["keepdim"])
        else:
            a = a.flatten(1)
    return a


def tpsgd_step(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    layers: list[dict],
    projections: Mapping[int, torch.Tensor],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    lr: float,
    trainable: set[str],
    local_loss: str = "mse",
    target_on: str = "pooled",
    skips: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """One tpSGD step ("Learning with Local Gradients at the Edge", 2022) by torch autograd.

    Every layer's input is captured (forward pre-hooks) in ONE forward at the pre-step
    weights; then each layer's local loss is rebuilt from its detached input and
    differentiated w.r.t. that layer's own parameters only.

    Args:
        model: torch module (eval mode).
        params: name -> float32 tensor of every parameter and float buffer.
        layers: the manifest's "layers" records (head last).
        projections: layer index -> B_i [classes, D_i] (from edgelearn.optim.tpsgd.projection),
            D_i the size of the layer's target point (see target_on).
        inputs: input batch. labels: int64 [N].
        lr: learning rate. trainable: names of the parameters to update.
        local_loss: "mse" (0.5/N ||a - B y||^2), "l1" (1/N |a - B y|_1) or "drtp"
            (-1/N <a, B y>).
        target_on: "pooled" (a after the layer's recorded post ops) or "activation".
        skips: layer name -> the layer whose input is the skip path of its residual add
            (default: its own input, as in `h + f(h)`).
    Returns: name -> updated tensor for every trainable parameter a layer owns.
    """
    captured: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(r["name"]).register_forward_pre_hook(
        lambda _m, args, name=r["name"]: captured.__setitem__(name, args[0].detach()))
        for r in layers]
    try:
        with torch.no_grad():
            functional_call(model, dict(params), (inputs,))
    finally:
        for h in hooks:
            h.remove()
    new: dict[str, torch.Tensor] = {}
    n = len(labels)
    for i, layer in enumerate(layers):
        norm = layer.get("bn") or layer.get("ln") or {}
        own = [*layer["params"].values(), *(norm[k] for k in ("weight", "bias") if k in norm)]
        own = [o for o in own if o in trainable]
        if not own:
            continue
        p = {k: (v.detach().clone().requires_grad_(k in own)) for k, v in params.items()}
        a = _local_forward(model, layer, p, captured[layer["name"]])
        if layer["head"]:
            loss = torch.nn.functional.cross_entropy(a, labels)
        else:
            if target_on == "pooled":
                a = _post(layer, a, captured[(skips or {}).get(layer["name"], layer["name"])])
            t = projections[i][labels].reshape(a.shape)
            if local_loss == "mse":
                loss = 0.5 * ((a - t) ** 2).sum() / n
            elif local_loss == "l1":
                loss = (a - t).abs().sum() / n
            else:
                loss = -(a * t).sum() / n
        grads = torch.autograd.grad(loss, [p[o] for o in own])
        for o, g in zip(own, grads, strict=True):
            new[o] = (params[o] - lr * g).detach()
    return new


def polystep_step(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    particles: list[tuple[str, int]],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    seed: int,
    step: int,
    eps: float,
    radius: float,
    probe_radius: float,
    loss_fn: LossFn = cross_entropy,
) -> tuple[dict[str, torch.Tensor], list[float], list[torch.Tensor]]:
    """One float32 PolyStep step (monolithic: every particle probed at the current weights).

    Uses the device's seeded draws (`projection_block`, `rotation`) as the ZO reference takes
    the device's z; everything else (candidates, assignment, barycentric step) is torch.

    Args:
        model: torch module (eval mode).
        params: name -> current float32 tensor of every parameter to override.
        particles: (parameter name, global particle index) in the device's particle order.
        inputs / targets: the batch.
        seed / step: run seed and step index.
        eps: softmax temperature on range-normalized costs.
        radius / probe_radius: step and probe radii.
        loss_fn: (output, targets) -> scalar loss.
    Returns: (new params of the trained names, the probe losses, dx per particle).
    """
    from edgelearn.optim.polystep import projection_block, rotation

    with torch.no_grad():
        losses: list[float] = []
        blocks, verts = [], []
        for name, i in particles:
            b = torch.from_numpy(projection_block(seed, step, i, params[name].numel()))
            rot = torch.from_numpy(rotation(seed, step, i))
            v = torch.cat([rot.T, -rot.T])  # 16 vertices +-R e_k
            blocks.append(b)
            verts.append(v)
            for j in range(v.shape[0]):
                u = (probe_radius * v[j]).float()
                cand = dict(params)
                cand[name] = params[name] + (u @ b).reshape(params[name].shape)
                losses.append(float(loss_fn(functional_call(model, cand, (inputs,)), targets)))
        new = {name: params[name].clone() for name, _ in particles}
        dxs = []
        for k in range(len(particles)):
            c = torch.tensor(losses[16 * k : 16 * (k + 1)], dtype=torch.float64)
            span = c.max() - c.min()
            c = (c - c.min()) / span if span > 0 else torch.zeros_like(c)
            w = torch.softmax(-c / eps, dim=0)
            dx = (radius * (w @ verts[k])).float()
            dxs.append(dx)
        acc: dict[str, torch.Tensor] = {}
        for (name, _), dx, b in zip(particles, dxs, blocks, strict=True):
            acc[name] = acc.get(name, torch.zeros(b.shape[1])) + dx @ b
        for name, a in acc.items():
            new[name] = params[name] + a.reshape(params[name].shape)
    return new, losses, dxs


def _loss_with(model: nn.Module, params: Mapping[str, torch.Tensor],
               delta: Mapping[str, torch.Tensor], inputs: torch.Tensor,
               targets: torch.Tensor, loss_fn: LossFn) -> float:
    """Loss of the model with `params` shifted by `delta` (names in delta only)."""
    cand = dict(params)
    for n, d in delta.items():
        cand[n] = params[n] + d
    return float(loss_fn(functional_call(model, cand, (inputs,)), targets))


def fzoo_step(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    zs: list[Mapping[str, torch.Tensor]],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    lr: float,
    eps: float,
    loss_fn: LossFn = cross_entropy,
) -> tuple[dict[str, torch.Tensor], list[float], list[float]]:
    """One FZOO step (Dang et al., ICLR 2026): one-sided probes, step / std of their losses.

    Args:
        zs: K >= 2 noise dicts (name -> float32 tensor) for the trainable parameters.
        others as in `zo_sgd_step`.
    Returns: (new params for the names in zs[0], g_k, [L_0, L_1..L_K]).
    """
    with torch.no_grad():
        l0 = _loss_with(model, params, {}, inputs, targets, loss_fn)
        losses = [_loss_with(model, params, {n: eps * zn for n, zn in z.items()}, inputs,
                             targets, loss_fn) for z in zs]
        sigma = float(torch.tensor(losses, dtype=torch.float64).std(unbiased=False))
        k = len(zs)
        gs = [(lk - l0) / (k * sigma) if sigma > 0 else 0.0 for lk in losses]
        new = {n: params[n] - lr * sum(g * z[n] for g, z in zip(gs, zs, strict=True))
               for n in zs[0]}
    return new, gs, [l0, *losses]


def adamezo_step(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    zs: list[Mapping[str, torch.Tensor]],
    moments: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    update: int,
    lr: float,
    eps: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    adam_eps: float = 1e-8,
    loss_fn: LossFn = cross_entropy,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]], list[float]]:
    """One ZO-Adam step on the SPSA estimate (AdaMeZO, Cai et al. 2026; Adam's rule).

    Args:
        zs: q noise dicts; moments: name -> (m, v) before the step; update: Adam's step count
            after this step (1 for the first).
    Returns: (new params, new moments, [L+_1, L-_1, ...]).
    """
    with torch.no_grad():
        losses, gs = [], []
        for z in zs:
            lp = _loss_with(model, params, {n: eps * zn for n, zn in z.items()}, inputs,
                            targets, loss_fn)
            lm = _loss_with(model, params, {n: -eps * zn for n, zn in z.items()}, inputs,
                            targets, loss_fn)
            losses += [lp, lm]
            gs.append((lp - lm) / (2.0 * eps))
        new, out = {}, {}
        for n in zs[0]:
            g = sum(gk * z[n] for gk, z in zip(gs, zs, strict=True)) / len(zs)
            m = beta1 * moments[n][0] + (1 - beta1) * g
            v = beta2 * moments[n][1] + (1 - beta2) * g * g
            mhat, vhat = m / (1 - beta1 ** update), v / (1 - beta2 ** update)
            new[n] = params[n] - lr * mhat / (vhat.sqrt() + adam_eps)
            out[n] = (m, v)
    return new, out, losses


def hybrid_step(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    layers: list[dict],
    projections: Mapping[int, torch.Tensor],
    z: Mapping[str, torch.Tensor],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    lr: float,
    zo_lr: float,
    eps: float,
    exact: set[str],
    eps_scale: Mapping[str, float] | None = None,
    lr_scale: Mapping[str, float] | None = None,
    each: bool = False,
) -> tuple[dict[str, torch.Tensor], tuple[float, float]]:
    """One hybrid step (ElasticZO-style, Sugiura & Matsutani 2025): SPSA on the tensors in `z`,
    tpSGD's exact rule on the tensors in `exact`, one probe.

    The ZO tensors are perturbed to theta +- eps m_eps z (losses L+, L-); the exact update is
    tpSGD's (`tpsgd_step`) at the weights of the second probe; then the ZO tensors move to
    theta - zo_lr m_lr g z, g = (L+ - L-) / (2 eps).

    Args:
        z: name -> float32 noise of each ZO tensor. exact: the tpSGD-updated names.
        eps_scale / lr_scale: per-tensor group multipliers (default 1).
        each: (option exact_each) an exact update after each of the two forwards, at that
            forward's ZO weights and the exact tensors as updated so far; L+- are the losses
            at the step's starting exact tensors.
        other args: as `tpsgd_step` and `zo_sgd_step`.
    Returns: (new params of the ZO and exact names, (L+, L-)).
    """
    eps_scale, lr_scale = eps_scale or {}, lr_scale or {}

    def at(sign: float) -> dict[str, torch.Tensor]:
        return {**params, **{n: params[n] + sign * eps * eps_scale.get(n, 1.0) * zn
                             for n, zn in z.items()}}

    with torch.no_grad():
        lp = float(cross_entropy(functional_call(model, at(1.0), (inputs,)), labels))
        lm = float(cross_entropy(functional_call(model, at(-1.0), (inputs,)), labels))
    if each:
        first = tpsgd_step(model, at(1.0), layers, projections, inputs, labels, lr=lr,
                           trainable=exact)
        new = tpsgd_step(model, {**at(-1.0), **first}, layers, projections, inputs, labels,
                         lr=lr, trainable=exact)
    else:
        new = tpsgd_step(model, at(-1.0), layers, projections, inputs, labels, lr=lr,
                         trainable=exact)
    g = (lp - lm) / (2.0 * eps)
    for n, zn in z.items():
        new[n] = params[n] - zo_lr * lr_scale.get(n, 1.0) * g * zn
    return new, (lp, lm)


def lozo_step(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    z: Mapping[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    lr: float,
    eps: float,
    loss_fn: LossFn = cross_entropy,
) -> tuple[dict[str, torch.Tensor], float, tuple[float, float]]:
    """One LOZO step (Chen et al., ICLR 2025): 2-D weights along U V^T, the rest along z.

    Args:
        factors: name -> (U [a, r], V [b, r]) of each 2-D trainable weight [a, b].
        z: name -> dense noise of every other trainable tensor.
        others as in `zo_sgd_step`.
    Returns: (new params for the names in factors and z, g, (L+, L-)).
    """
    # MeZO's step along the dense direction U V^T: only the direction differs
    dirs = {n: u @ v.T for n, (u, v) in factors.items()} | dict(z)
    return zo_sgd_step(model, params, dirs, inputs, targets, lr=lr, eps=eps, loss_fn=loss_fn)


def candidate_outputs(model: nn.Module, params: Mapping[str, torch.Tensor],
                      inputs: torch.Tensor, z: Mapping[str, torch.Tensor], eps: float
                      ) -> torch.Tensor:
    """The model's outputs at params + eps z (z names a subset of params; {}: params)."""
    cand = {**params, **{n: params[n] + eps * zn for n, zn in z.items()}}
    return functional_call(model, cand, (inputs,))


def zo_gn_coefficients(out: torch.Tensor, targets: torch.Tensor, *, eps: float,
                       damping: float, n: int, damping_scale: str = "curvature",
                       trust: float | None = 1.0, loss: str = "cross-entropy") -> torch.Tensor:
    """The coefficients a of a zo-gn step on cross-entropy from its candidates' logits (or on
    bce from their sigmoid probabilities, taken to logits), float64 [K]: Jacobian by forward
    differences, gradient and softmax-covariance products, damped solve.

    Args:
        out: logits of theta and of theta + eps z_k, [K + 1, batch, classes] (any float);
            bce: probabilities [K + 1, batch(, 1)].
        targets: int labels [batch] (bce: 0/1).
        damping: Levenberg-Marquardt lambda: times Marquardt's scale (G's diagonal, floored at
            1e-3 of its mean; damping_scale "curvature") or times n, the trainable count
            ("weights": per unit-norm direction).
        trust: the largest RMS of the logits' predicted change sum_k a_k J_k (None: any).
        loss: "cross-entropy" or "bce" (two-class cross-entropy in logits: the probability
            of class 1 is sigmoid(logit), of class 0 its complement).
    """
    o = out.double()
    if loss == "bce":  # logits of the clipped probabilities, as two-class logits [0, logit]
        z = torch.logit(o.reshape(o.shape[0], -1), eps=1e-7)
        o, targets = torch.stack([torch.zeros_like(z), z], dim=-1), targets.long()
    f0 = o[0]
    jac = (o[1:] - f0) / eps  # [K, batch, classes]
    b = f0.shape[0]
    p = torch.softmax(f0, dim=1)
    onehot = torch.nn.functional.one_hot(targets, f0.shape[1]).double()
    grad_f = (p - onehot) / b
    cov = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / b  # [batch, c, c]
    g = torch.einsum("kbc,bc->k", jac, grad_f)
    G = torch.einsum("kbc,bcd,jbd->kj", jac, cov, jac)
    if loss == "bce":  # the outputs' change is the logit's: one column of the two moves
        jac = jac[..., 1:]
    if damping_scale == "curvature":
        diag = torch.diagonal(G)
        scale = torch.diag(torch.clamp(diag, min=1e-3 * float(diag.mean())))
    else:
        scale = n * torch.eye(len(jac), dtype=torch.float64)
    a = torch.linalg.solve(G + damping * scale, g)
    rms = float(torch.einsum("k,kbc->bc", a, jac).pow(2).mean().sqrt())
    return a if trust is None or rms <= trust else a * (trust / rms)


def zo_gn_step(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    zs: list[Mapping[str, torch.Tensor]],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    lr: float,
    eps: float,
    damping: float,
    damping_scale: str = "curvature",
    trust: float | None = 1.0,
    loss: str = "cross-entropy",
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One zo-gn step (Cartis & Roberts 2023; generalized Gauss-Newton, Schraudolph 2002) on
    cross-entropy: Jacobian of the logits along each z_k by forward differences, damped GN
    solve in float64, written directly as gradient and softmax-covariance products.

    Args:
        zs: K noise dicts (name -> float32 tensor) for the trainable parameters.
        damping, damping_scale, trust, loss: as in `zo_gn_coefficients` (bce: the model
            outputs sigmoid probabilities).
    Returns: (new params for the names in zs[0], a_k).
    """
    with torch.no_grad():
        out = torch.stack([candidate_outputs(model, params, inputs, z, eps)
                           for z in [{}, *zs]])
        n = sum(z.numel() for z in zs[0].values())
        a = zo_gn_coefficients(out, targets, eps=eps, damping=damping, n=n,
                               damping_scale=damping_scale, trust=trust, loss=loss)
        new = {name: params[name] - lr * sum(float(ak) * z[name] for ak, z in
                                             zip(a, zs, strict=True)) for name in zs[0]}
    return new, [float(v) for v in a]


def zo_readout_step(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    zs: list[Mapping[str, torch.Tensor]],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    lr: float,
    eps: float,
    head: tuple[str, str] = ("head.weight", "head.bias"),
    trust: float | None = 1.0,
) -> dict[str, torch.Tensor]:
    """One zo-readout step on cross-entropy: each probe's logit change read as U_k h_b +
    beta_k, the head's gradient in the probed input directions by least squares
    (torch.linalg.pinv), scaled down so that the RMS change of the batch's logits is at
    most `trust`, then plain SGD on the head.

    Args:
        zs: K noise dicts (name -> float32 tensor) over the head's weight [C, D] and bias [C].
        head: the names of the head's weight and bias (the trainable set).
        trust: the trust region on the logits' RMS change (None: none).
    Returns: the new weight and bias.
    """
    w, b = head
    with torch.no_grad():
        z0 = candidate_outputs(model, params, inputs, {}, eps).double()
        reads = torch.cat([(candidate_outputs(model, params, inputs, z, eps).double() - z0)
                           / eps - z[b].double() for z in zs], dim=1)  # [batch, K C]
        rows = torch.cat([z[w].double() for z in zs])  # [K C, D]
        h = reads @ torch.linalg.pinv(rows).T  # the head inputs, read: [batch, D]
        e = (torch.softmax(z0, 1) - torch.nn.functional.one_hot(targets, z0.shape[1])) \
            / z0.shape[0]
        gw, gb = e.T @ h, e.sum(0)
        # the logits' change: -lr (G h_b + gb), and G h_b = G R^+ (R h_b) = G R^+ reads_b
        change = lr * (reads @ (gw @ torch.linalg.pinv(rows)).T + gb)
        rms = float(change.pow(2).mean().sqrt())
        scale = 1.0 if trust is None or rms <= trust else trust / rms
        return {w: params[w] - lr * scale * gw.float(), b: params[b] - lr * scale * gb.float()}
