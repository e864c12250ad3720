"""Can stage 1's encoder and generator draw a factor at all, and what stops them?

    python benchmarks/recon_probe.py --code ae|noise|stage1|stage [--iterations 3000]
        [--every 1000] [--dataset sprites] [OVERRIDE ...]

Trains the run's own E and G (the config's architecture, stage-1 learning
rate, betas and batch size) as an autoencoder on the whole code (the unknown
and labeled codes' total size, all of it from E), or stage 1 itself, and, every
``--every`` iterations, reads E's means drawn back by G with the evaluation's oracles:
per factor, the share of test reconstructions the oracle reads as the real
image's class (and the PSNR).

``--code`` chooses what G sees in training:

- ``ae``: E's means (a plain deterministic autoencoder);
- ``noise``: a sample ``mean + std * N(0, 1)`` from E's Gaussian, no code losses;
- ``stage1``: that sample plus stage 1's code and batch losses at the config's
  ``stage1.ucode_weight`` and ``stage1.ubatch_weight`` (the batch loss ramped in
  by ``stage1.ubatch_ramp`` when the config sets it, as stage 1 does);
- ``stage``: no autoencoder but the ``Stage1`` class itself, with the labeled
  factors ``quality.py`` gives the dataset (its own codes, losses, nested dropout
  and adversary, as the config sets them); G1 draws E's means with B1's codes of
  the test images' own labels.

``--code-ramp N`` (not with ``stage``) grows the noise (its std's factor) and
both code losses linearly from 0 to full over the first N iterations.

A factor ``ae`` draws and ``stage1`` does not is lost to the code's noise and
losses, not to the networks (docs/benchmarks.md, "Sprites: where orientation
is lost"). One seed (0); the same command repeats its figures on one machine.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from quality import LABELED   # the datasets and labeled factors quality.py judges


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", choices=("ae", "noise", "stage1", "stage"), required=True)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--dataset", choices=sorted(LABELED), default="sprites")
    parser.add_argument("--config", default="quality", help="preset or YAML (default: quality)")
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--cache", default=str(Path.home() / ".disunknown" / "oracles"),
                        help="oracle cache directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--code-ramp", type=int, default=0, metavar="N",
                        help="the noise and the code losses grow from 0 to full over N iterations")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    if args.iterations < 1 or args.every < 1 or args.code_ramp < 0:
        parser.error("--iterations and --every must be >= 1, --code-ramp >= 0")
    if args.code == "stage" and args.code_ramp:
        parser.error("--code-ramp: not with --code stage (stage 1 has its own ramps, e.g. stage1.ubatch_ramp)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from dsu_models.evaluation import load_or_train_oracles
    from dsu_models.config import load_config
    from dsu_models.data.configured import load_data
    from dsu_models.nn.builders import generator_code_size

    cfg = load_config(args.config, [f"dataset={args.dataset}", LABELED[args.dataset]] + args.overrides)
    train, val, test = load_data(cfg)
    oracles = load_or_train_oracles(train, test, cfg.evaluate, args.cache, "cpu")
    size, s = generator_code_size(cfg), cfg.stage1
    test_labels = test.labels[:args.test_images]
    test_x = test.images[:args.test_images].float() / 127.5 - 1   # once, for every report
    print(f"recon_probe: {cfg.dataset} {cfg.image_size} px, code {args.code} ({size} dims), "
          f"batch {s.batch_size}, lr {s.lr}, betas {s.betas}"
          + (f", ucode_weight {s.ucode_weight}, ubatch_weight {s.ubatch_weight}"
             if args.code in ("stage1", "stage") else "")
          + (f", labeled {cfg.labeled_factors}, unknown {cfg.unknown_size} dims"
             if args.code == "stage" else ""), flush=True)
    if args.code == "stage":
        step, reconstruct, set_training = stage1_itself(cfg, train, test_labels)
    else:
        step, reconstruct, set_training = autoencoder(cfg, train.images.float() / 127.5 - 1, args)

    @torch.no_grad()
    def report(it: int, started: float):
        set_training(False)
        rec = torch.cat([reconstruct(test_x[i:i + 250], slice(i, i + 250))
                         for i in range(0, len(test_x), 250)])
        mse = (rec - test_x).square().mean().item()
        kept = (oracles.predict(rec) == test_labels).float().mean(0)
        rate = s.batch_size * it / (time.perf_counter() - started)
        print(f"{it:>6} | {rate:.0f} img/s | psnr {10 * torch.log10(torch.tensor(4 / mse)).item():.1f} | "
              "kept " + " ".join(f"{f.name} {a:.3f}" for f, a in zip(train.factors, kept)), flush=True)
        set_training(True)

    started = time.perf_counter()
    for it in range(1, args.iterations + 1):
        step(it, torch.randint(0, len(train.images), (s.batch_size,)))
        if it % args.every == 0 or it == args.iterations:
            report(it, started)
    return 0


def autoencoder(cfg, images: torch.Tensor, args):
    """E and G over the whole code (``--code ae|noise|stage1``): the training step
    ``step(it, rows)``, ``reconstruct(x, rows)`` from E's means and ``set_training``."""
    from dsu_models import codes, losses
    from dsu_models.nn.builders import build_encoder, build_generator, generator_code_size
    from dsu_models.stages.common import ramp, ramped

    s = cfg.stage1
    encoder = build_encoder(cfg, [generator_code_size(cfg)], zero_init=True)
    generator = build_generator(cfg)
    optimizer = torch.optim.Adam(list(encoder.parameters()) + list(generator.parameters()),
                                 lr=s.lr, betas=tuple(s.betas))

    def drawn(x: torch.Tensor, noise: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """G's drawing of E's code for ``x``, the code sampled with its std times ``noise``."""
        ((mean, std),) = encoder(x)
        u = mean + noise * std * torch.randn_like(mean) if noise else mean
        x_hat, noise_std = generator(torch.cat([u, torch.zeros_like(mean)], 1))
        return x_hat, noise_std, mean, std

    def step(it: int, rows: torch.Tensor):
        x = images[rows]
        grown = ramp(it - 1, 0, args.code_ramp)   # 1 without --code-ramp
        x_hat, noise_std, mean, std = drawn(x, 0.0 if args.code == "ae" else grown)
        loss = losses.reconstruction_nll(x_hat, x, noise_std)
        if args.code == "stage1":
            batch_weight = ramped(s.ubatch_weight, s.ubatch_ramp, it - 1)   # as stage 1 weighs it
            loss = (loss + grown * s.ucode_weight * codes.code_loss(mean, std, None)
                    + grown * batch_weight * codes.batch_loss(mean, std, None))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def set_training(on: bool):
        encoder.train(on)
        generator.train(on)

    return step, (lambda x, rows: drawn(x, 0.0)[0]), set_training


def stage1_itself(cfg, train, test_labels: torch.Tensor):
    """The ``Stage1`` class with the config's labeled factors (``--code stage``): its
    own codes, losses, dropout and adversary; ``reconstruct`` draws G1(E's means,
    B1's means of the test images' labels)."""
    from dsu_models.stages.stage1 import Stage1

    names = [f.name for f in train.factors]
    labeled = [names.index(n) for n in cfg.labeled_factors]
    stage = Stage1(cfg, [train.factors[j] for j in labeled])

    def step(it: int, rows: torch.Tensor):
        stage.train_step({"image": train.images[rows], "labels": train.labels[rows][:, labeled]})

    def reconstruct(x: torch.Tensor, rows: slice) -> torch.Tensor:
        u = stage.encoder(x)[0][0] if stage.encoder is not None else None
        means = [emb(test_labels[rows, j])[0] for emb, j in zip(stage.embedders, labeled)]
        return stage.generate(u, means)

    return step, reconstruct, stage.train


if __name__ == "__main__":
    raise SystemExit(main())
