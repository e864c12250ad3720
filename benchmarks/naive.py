"""Straightforward implementations of stage 1 and stage 2 steps, for comparison.

Same networks, same losses, same math as ``dsu_models.stages``; written the
way a first implementation usually is: separate update passes per player
(classifier / discriminator first on freshly generated, detached images, then
the generator side re-generating them), ``requires_grad`` toggling instead of
detached calls, a second backward pass to keep the adversarial gradient out
of the generator's conv part, and a per-sample loop for the random offset.
The benchmark runs these steps on the library's reference path
(``dsu_models.nn.reference.plain_layers``: weight norm as ``v * g / ||v||``, the
self-normalising PReLU and its moments through autograd, no shift folded into
the previous layer's bias, aten's pooling and transposed conv) with plain Adam
(``reference.plain_optimizers``), so that the whole baseline is a first
implementation of the same networks and math; the reference path is checked
against the fast one in tests/test_perf_equivalence.py. The steps here are
for the benchmark only.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from dsu_models import codes, losses
from dsu_models.nn import layers, networks, reference
from dsu_models.stages.classifier import ClassifierStage
from dsu_models.stages.lenc import LencStage
from dsu_models.stages.stage1 import Stage1, keep_tensor, rolled_labels
from dsu_models.stages.stage2 import Stage2


_REMOVED = [(layers.SNPReLU, "forward", lambda self, x: x),
            (layers.SNPReLU, "forward_shifted", lambda self, t: t),
            (layers.ResidualAdd, "forward", lambda self, shortcut, residual: shortcut + residual),
            (networks, "avg_pool_2x2", lambda x, pad=0: F.pad(x, (pad,) * 4)[:, :, ::2, ::2])]


def without_elementwise_layers():
    """Context manager: within it the activations are identities, the residual
    adds plain sums and the pools strided subsamples: NOT the method, only a
    bound. What is left (convolutions, linear layers, weight norm, losses, Adam)
    is work any implementation of the networks does, so a step timed there
    bounds what faster elementwise layers could ever gain."""
    return reference.swapped(_REMOVED)


def offset_loop(*images):
    """Random offset, one image at a time."""
    size = images[0].shape[-1]
    s = size // 4
    out = [torch.empty_like(x) for x in images]
    for i in range(images[0].shape[0]):
        dy = int(torch.randint(0, s, ()) + torch.randint(0, s, ()))
        dx = int(torch.randint(0, s, ()) + torch.randint(0, s, ()))
        for x, o in zip(images, out):
            padded = F.pad(x[i], (s, s, s, s))
            o[i] = padded[:, dy:dy + size, dx:dx + size]
    return out if len(out) > 1 else out[0]


def _set_grad(module, flag: bool):
    for p in module.parameters():
        p.requires_grad_(flag)


def naive_stage1_step(st: Stage1, batch: dict):
    """One stage-1 iteration, straightforwardly (compound classifier mode)."""
    s = st.scfg
    batch = st.to_device(batch)
    x, y = batch["image"], batch["labels"]
    st.set_lrs()

    def labeled(labels):
        out_c, out_m, loss_c, loss_b = [], [], 0.0, 0.0
        for k, emb in enumerate(st.embedders):
            mean, std = emb(labels[:, k])
            c, m = codes.sample_code(mean, std, st.keep_l[k], training=True)
            out_c.append(c)
            out_m.append(m)
            loss_c = loss_c + emb.code_loss(st.keep_l[k])
            loss_b = loss_b + codes.batch_loss(mean, std, st.keep_l[k])
        return out_c, out_m, loss_c, loss_b

    # 1) classifier update on detached inputs
    with torch.no_grad():
        ((mu, sigma),) = st.encoder(x)
        u, u_mask = codes.sample_code(mu, sigma, st.keep_u, training=True)
        alt_c, alt_m, _, _ = labeled(rolled_labels(y))
        cross, _ = st.generator(codes.generator_input([u] + alt_c, [u_mask] + alt_m))
        cross = offset_loop(cross)
    opt_c = st.optimizers["classifier"]
    opt_c.zero_grad()
    lp = st.classifier(cross, u, u_mask)
    nll = sum(F.nll_loss(l, y[:, k]) for k, l in enumerate(lp))
    nll.backward()
    opt_c.step()

    # 2) encoder / embedder / generator update
    opt = st.optimizers["main"]
    opt.zero_grad()
    ((mu, sigma),) = st.encoder(x)
    u, u_mask = codes.sample_code(mu, sigma, st.keep_u, training=True)
    l_c, l_m, lcode, lbatch = labeled(y)
    x_hat, noise = st.generator(codes.generator_input([u] + l_c, [u_mask] + l_m))
    main = (s.rec_weight * losses.reconstruction_nll(x_hat, x, noise)
            + s.ucode_weight * codes.code_loss(mu, sigma, st.keep_u)
            + s.ubatch_weight * codes.batch_loss(mu, sigma, st.keep_u)
            + s.lcode_weight * lcode + s.lbatch_weight * lbatch)
    alt_c, alt_m, _, _ = labeled(rolled_labels(y))
    cross, _ = st.generator(codes.generator_input([u] + alt_c, [u_mask] + alt_m))
    _set_grad(st.classifier, False)
    lp = st.classifier(offset_loop(cross), u, u_mask)
    adv = sum(losses.adversarial_nlu(l, y[:, k], st.freqs[k]) for k, l in enumerate(lp))
    _set_grad(st.classifier, True)
    main.backward(retain_graph=True)
    conv_grads = [p.grad.clone() for p in st.generator.conv.parameters()]
    (s.cla1_weight * adv).backward()
    for p, g in zip(st.generator.conv.parameters(), conv_grads):
        p.grad = g  # the adversary must not train G's conv part
    opt.step()
    st.iteration += 1
    return float(main.detach()), float(adv.detach()), float(nll.detach())


def naive_stage2_step(st: Stage2, batch: dict):
    """One stage-2 iteration (dis mode, rec + cross branch), straightforwardly:
    a D/R pass on detached fakes, then a generator pass that regenerates them."""
    s = st.scfg
    batch = st.to_device(batch)
    x, y = batch["image"], batch["labels"]
    st.set_lrs()
    G2, G1, D, R = st.models["generator"], st.generator1, st.models["discriminator"], st.models["classifier"]
    B2, B1 = st.models["embedders"], st.embedders1
    opt = st.optimizers["main"]
    keep_l = [keep_tensor(spec.keep_prob, st.device) for _, spec in st.cfg.labeled()]

    def fakes():
        u = batch["mu"] + batch["sigma"] * torch.randn_like(batch["mu"])
        y_alt = rolled_labels(y)
        out = {}
        for name, labels in (("rec", y), ("cross", y_alt)):
            l_c, l_m = [], []
            for k, emb in enumerate(B2):
                mean, std = emb(labels[:, k])
                c, m = codes.sample_code(mean, std, keep_l[k], training=True)
                l_c.append(c)
                l_m.append(m)
            ones = [torch.ones_like(u)]
            img, noise = G2(codes.generator_input([u] + l_c, ones + l_m))
            with torch.no_grad():
                means = [emb(labels[:, k])[0] for k, emb in enumerate(B1)]
                partner, _ = G1(codes.generator_input([u] + means, ones + [torch.ones_like(m) for m in means]))
            out[name] = (img, noise, partner, labels)
        return out

    # 1) D and R on detached fakes
    opt.zero_grad()
    f = fakes()
    d_loss, r_loss = 0.0, 0.0
    real_pair = offset_loop(torch.cat([x, f["rec"][2]], 1))
    for name in ("rec", "cross"):
        img, _, partner, labels = f[name]
        fake_pair = offset_loop(torch.cat([img.detach(), partner], 1))
        d_loss = d_loss + 0.5 * losses.lsgan_d_loss(D(real_pair), D(fake_pair))
        logits = R(offset_loop(img.detach()))
        r_loss = r_loss + 0.5 * sum(losses.cla2_fake_loss(l, labels[:, k]) for k, l in enumerate(logits))
    logits = R(offset_loop(x))
    r_loss = r_loss + sum(losses.cla2_real_loss(l, y[:, k]) for k, l in enumerate(logits))
    (s.dis_weight * d_loss + s.cla2_fake_weight * r_loss).backward()
    d_params = list(D.parameters()) + list(R.parameters())
    saved = [p.grad.clone() for p in d_params]

    # 2) generator side, regenerating the fakes
    for p in d_params:
        p.grad = None
    _set_grad(D, False)
    _set_grad(R, False)
    f = fakes()
    g_loss = s.rec_weight * losses.reconstruction_nll(f["rec"][0], x, f["rec"][1])
    for name in ("rec", "cross"):
        img, _, partner, labels = f[name]
        g_loss = g_loss + 0.5 * s.dis_weight * losses.lsgan_g_loss(D(offset_loop(torch.cat([img, partner], 1))))
        logits = R(offset_loop(img))
        g_loss = g_loss + 0.5 * s.cla2_weight * sum(losses.cla2_generator_loss(l, labels[:, k])
                                                    for k, l in enumerate(logits))
    g_loss.backward()
    _set_grad(D, True)
    _set_grad(R, True)
    for p, g in zip(d_params, saved):
        p.grad = g
    opt.step()
    st.iteration += 1
    return float(g_loss.detach()), float(d_loss.detach())


def naive_classifier_step(st: ClassifierStage, batch: dict):
    """One classifier iteration with the per-sample random offset."""
    batch = st.to_device(batch)
    x, y = batch["image"], batch["labels"]
    st.set_lrs()
    if st.scfg.random_offset:
        x = offset_loop(x)
    opt = st.optimizers["classifier"]
    opt.zero_grad()
    logits = st.classifier(x)
    nll = sum(losses.classifier_nll(lg, y[:, k], classes=n)
              for k, (lg, n) in enumerate(zip(logits, st.class_counts)))
    nll.backward()
    opt.step()
    st.iteration += 1
    return float(nll.detach())


def naive_lenc_step(st: LencStage, batch: dict):
    """One labeled-encoder iteration; with ``generated_weight`` > 0, S runs on
    the real and the generated batch in two forwards."""
    batch = st.to_device(batch)
    x, y = batch["image"], batch["labels"]
    st.set_lrs()
    w = st.scfg.generated_weight
    opt = st.optimizers["label_encoder"]
    opt.zero_grad()
    with torch.no_grad():
        targets = st.targets(y)
    total = losses.labeled_encoder_loss(targets, st.encoder(x))
    if w:
        x_gen, gen_targets = st.generated_batch(y, x.dtype)
        total = (1.0 - w) * total + w * losses.labeled_encoder_loss(gen_targets, st.encoder(x_gen))
    total.backward()
    opt.step()
    st.iteration += 1
    return float(total.detach())
