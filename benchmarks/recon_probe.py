"""Can stage 1's encoder and generator draw a factor at all, and what stops them?

    python benchmarks/recon_probe.py --code ae|noise|stage1 [--iterations 3000]
        [--every 1000] [--dataset sprites] [OVERRIDE ...]

Trains the run's own E and G (the config's architecture, stage-1 learning
rate, betas and batch size) as an autoencoder on the whole code (the unknown
and labeled codes' total size, all of it from E) and, every ``--every``
iterations, reads E's means drawn back by G with the evaluation's oracles:
per factor, the share of test reconstructions the oracle reads as the real
image's class (and the PSNR).

``--code`` chooses what G sees in training:

- ``ae``: E's means (a plain deterministic autoencoder);
- ``noise``: a sample ``mean + std * N(0, 1)`` from E's Gaussian, no code losses;
- ``stage1``: that sample plus stage 1's code and batch losses at the config's
  ``stage1.ucode_weight`` and ``stage1.ubatch_weight``.

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
    parser.add_argument("--code", choices=("ae", "noise", "stage1"), required=True)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--dataset", choices=sorted(LABELED), default="sprites")
    parser.add_argument("--config", default="quality", help="preset or YAML (default: quality)")
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--cache", default=str(Path.home() / ".disunknown" / "oracles"),
                        help="oracle cache directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    if args.iterations < 1 or args.every < 1:
        parser.error("--iterations and --every must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from dsu_models import codes, losses
    from dsu_models.evaluation import load_or_train_oracles
    from dsu_models.factory import build_config, load_data
    from dsu_models.models import build_encoder, build_generator, generator_code_size

    cfg = build_config(args.config, [f"dataset={args.dataset}", LABELED[args.dataset]] + args.overrides)
    train, test = load_data(cfg)
    oracles = load_or_train_oracles(train, test, cfg.evaluate, args.cache, "cpu")
    size, s = generator_code_size(cfg), cfg.stage1
    print(f"recon_probe: {cfg.dataset} {cfg.image_size} px, code {args.code} ({size} dims), "
          f"batch {s.batch_size}, lr {s.lr}, betas {s.betas}"
          + (f", ucode_weight {s.ucode_weight}, ubatch_weight {s.ubatch_weight}"
             if args.code == "stage1" else ""), flush=True)
    encoder = build_encoder(cfg, [size], zero_init=True)
    generator = build_generator(cfg)
    optimizer = torch.optim.Adam(list(encoder.parameters()) + list(generator.parameters()),
                                 lr=s.lr, betas=tuple(s.betas))
    images = train.images.float() / 127.5 - 1
    test_images, test_labels = test.images[:args.test_images], test.labels[:args.test_images]

    def drawn(x: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ((mean, std),) = encoder(x)
        u = mean + std * torch.randn_like(mean) if sample else mean
        x_hat, noise_std = generator(torch.cat([u, torch.zeros_like(mean)], 1))
        return x_hat, noise_std, mean, std

    @torch.no_grad()
    def report(it: int, started: float):
        encoder.eval()
        generator.eval()
        recs = [drawn(test_images[i:i + 250].float() / 127.5 - 1, False)[0]
                for i in range(0, len(test_images), 250)]
        rec = torch.cat(recs)
        mse = (rec - (test_images.float() / 127.5 - 1)).square().mean().item()
        kept = (oracles.predict(rec) == test_labels).float().mean(0)
        rate = s.batch_size * it / (time.perf_counter() - started)
        print(f"{it:>6} | {rate:.0f} img/s | psnr {10 * torch.log10(torch.tensor(4 / mse)).item():.1f} | "
              "kept " + " ".join(f"{f.name} {a:.3f}" for f, a in zip(train.factors, kept)), flush=True)
        encoder.train()
        generator.train()

    started = time.perf_counter()
    for it in range(1, args.iterations + 1):
        x = images[torch.randint(0, len(images), (s.batch_size,))]
        x_hat, noise_std, mean, std = drawn(x, args.code != "ae")
        loss = losses.reconstruction_nll(x_hat, x, noise_std)
        if args.code == "stage1":
            loss = (loss + s.ucode_weight * codes.code_loss(mean, std, None)
                    + s.ubatch_weight * codes.batch_loss(mean, std, None))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if it % args.every == 0 or it == args.iterations:
            report(it, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
