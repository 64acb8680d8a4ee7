"""``pyro-vae diagnose``: the diagnostics of a run folder, written beside it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pyro_vae.app.flags import compile_flag, int_list


def add_parser(commands: Any) -> None:
    """``pyro-vae diagnose`` and its flags, on the subparsers ``commands``."""
    parser = commands.add_parser(
        "diagnose",
        help="NUTS reference posterior, amortization and approximation gaps, PSIS k-hat",
        description="For test images of a run: sample p(z|x) with NUTS (ArviZ InferenceData "
        "next to the guide's draws), measure the approximation and amortization gaps "
        "(Cremer et al. 2018) and PSIS k-hat; write netCDF, diagnostics.json/.md and plots.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--images", type=int, default=10, help="first N test images")
    parser.add_argument("--image-ids", type=int_list, help="test image indices, e.g. 3,17")
    parser.add_argument("--chains", type=int, default=4, help="NUTS chains")
    parser.add_argument("--warmup", type=int, default=300, help="NUTS warm-up steps")
    parser.add_argument("--samples", type=int, default=300, help="NUTS draws per chain")
    parser.add_argument("--is-samples", type=int, default=5000, help="K for log p(x)")
    parser.add_argument("--local-steps", type=int, default=1000, help="local SVI steps")
    parser.add_argument("--khat-images", type=int, default=1000, help="images for k-hat")
    parser.add_argument("--khat-samples", type=int, default=1000, help="K for k-hat")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-jit", action="store_true", help="NUTS without the JIT")
    parser.add_argument("--out", type=Path, help="default RUN_DIR/diagnostics")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier diagnostics")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the model runs: NUTS, local SVI, importance weights",
    )
    compile_flag(parser, "the importance weights")


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from pyro_vae.app.diagnose import diagnose
    from pyro_vae.app.diagnose_report import console_lines

    result = diagnose(
        args.run_dir,
        args.out,
        images=args.images,
        image_ids=args.image_ids,
        chains=args.chains,
        warmup=args.warmup,
        samples=args.samples,
        is_samples=args.is_samples,
        local_steps=args.local_steps,
        khat_images=args.khat_images,
        khat_samples=args.khat_samples,
        seed=args.seed,
        jit=not args.no_jit,
        overwrite=args.overwrite,
        progress=not args.quiet,
        compile=args.compile,
        device=args.device,
    )
    for line in console_lines(result):
        print(line)
    out = args.out or args.run_dir / "diagnostics"
    print(f"diagnostics: {out / 'diagnostics.md'}")
    return 0
