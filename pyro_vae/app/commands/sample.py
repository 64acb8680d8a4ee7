"""``pyro-vae sample``: decode draws from a run's prior into a PNG grid."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from pyro_vae.errors import UserInputError


def add_parser(commands: Any) -> None:
    """``pyro-vae sample`` and its flags, on the subparsers ``commands``."""
    parser = commands.add_parser(
        "sample",
        help="decode samples from the prior into a PNG grid",
        description="Draw z from the prior of a run folder's model and save the means of "
        "p(x|z) (or draws, --draw) as a PNG grid; small images are scaled up to at least "
        "32 pixels a side (nearest neighbour). Needs no data.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--n", type=int, default=64, help="number of samples")
    parser.add_argument("--out", type=Path, help="PNG file (default RUN_DIR/plots/samples-N.png)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draw", action="store_true", help="draw x ~ p(x|z) instead of its mean")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the file --out names if it exists"
    )


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    import contextlib

    from pyro_vae.app.runs import check_no_links, load_run
    from pyro_vae.io import atomic_write_bytes, confined, make_folder

    if args.n < 1:
        raise UserInputError(f"--n must be >= 1, got {args.n}")
    out = args.out or args.run_dir / "plots" / f"samples-{args.n}.png"
    if out.exists() and out.is_dir():
        raise UserInputError(f"--out {out} is a folder: pass a PNG file name")
    if out.suffix.lower() != ".png":
        raise UserInputError(f"--out {out} must end in .png")
    if args.out is not None and (out.exists() or out.is_symlink()) and not args.overwrite:
        raise UserInputError(
            f"--out {out} exists: pass --overwrite to replace it, or another file name"
        )
    # the default file is the run's own (RUN/plots): no link there is followed
    inside = args.out is None
    if inside:
        check_no_links(args.run_dir)
    run = load_run(args.run_dir, with_data=False)  # sampling needs no data
    config, vae = run.config, run.model
    import torch
    from torchvision.utils import save_image

    from pyro_vae.data import data_shape_of
    from pyro_vae.models.protocol import image_shape, prior_samples
    from pyro_vae.resources import check_sampling_fits

    shape = tuple(getattr(vae, "data_shape", None) or data_shape_of(config.data.dataset))
    check_sampling_fits(config.model, shape, args.n)
    torch.manual_seed(args.seed)
    example = torch.zeros(1, math.prod(shape))  # (the data reach a model flattened)
    samples = prior_samples(vae, args.n, example, mean=not args.draw)
    samples = samples.reshape(args.n, *image_shape(vae, example))
    scale = -(-32 // min(samples.shape[-2:]))  # small images (8x8 digits) scaled up
    if scale > 1:
        samples = torch.nn.functional.interpolate(samples, scale_factor=scale, mode="nearest")
    import io

    buffer = io.BytesIO()
    grid = samples.clamp(0, 1)
    save_image(grid, buffer, format="png", nrow=max(1, int(args.n**0.5)), padding=1, pad_value=1.0)
    with confined(args.run_dir) if inside else contextlib.nullcontext():
        make_folder(out.parent)
        # a file that appeared meanwhile is still not replaced without --overwrite
        atomic_write_bytes(buffer.getvalue(), out, replace=args.overwrite or inside)
    print(out)
    return 0
