"""Convert a diffusers-format Stable Diffusion folder to a jedi_jax model folder, or back.

    python -m jedi_jax.convert --src ./stable-diffusion-v1-5 --dst ./sd15-jax --unet-in-channels 9
    python -m jedi_jax.convert --export-diffusers --src ./sd15-jax --dst ./sd15-diffusers

No PyTorch is needed: weights are read from safetensors. Conversion is strict: a missing,
unexpected or mis-shaped tensor stops it with a message naming the tensor, and no output is left.
"""
from __future__ import annotations

import argparse
import sys
import time

from jedi_jax.convert.torch_naming import ConversionError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jedi_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="diffusers folder (or jedi_jax folder with --export-diffusers)")
    parser.add_argument("--dst", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--unet-in-channels", type=int, default=None,
                        help="widen the UNet's conv_in to 2*latent_channels+1 channels (9 for SD: the JeDi layout), "
                             "the new ones zero-initialized; the source's own width is also accepted")
    parser.add_argument("--variant", default=None,
                        help="weights variant, e.g. fp16 (reads *.fp16.safetensors, or the shards listed in "
                             "*.safetensors.index.fp16.json)")
    parser.add_argument("--export-diffusers", action="store_true", help="write a jedi_jax folder back as diffusers")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from jedi_jax.convert.pipeline_folder import convert_diffusers_folder, export_diffusers_folder

    start = time.time()
    try:
        if args.export_diffusers:
            out = export_diffusers_folder(args.src, args.dst, overwrite=args.overwrite)
        else:
            out = convert_diffusers_folder(args.src, args.dst, unet_in_channels=args.unet_in_channels,
                                           variant=args.variant, overwrite=args.overwrite)
    except (ConversionError, OSError, ValueError) as e:  # OSError: FileExistsError, permissions, a full disk ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
