"""``functorch-diary style``: neural style transfer (Gatys et al.) with VGG19 features.

    functorch-diary style --content a.png --style b.png --weights vgg19.pth \\
        --out out.png --steps 300 --size 256
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import functional as TF
from tqdm import tqdm

from ..zoo.style import load_vgg19_features, make_style_loss, transfer
from .args import device, non_negative_float, output_file, positive_int
from .errors import failure


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "style",
        help="neural style transfer with VGG19 features and Gram matrices",
        description="Optimise an image to keep CONTENT's VGG19 features and take STYLE's Gram "
        "matrices. Needs torchvision's vgg19 IMAGENET1K_V1 weights as a local file.",
    )
    parser.add_argument("--content", type=Path, required=True, help="content image")
    parser.add_argument("--style", type=Path, required=True, help="style image")
    parser.add_argument(
        "--weights",
        type=Path,
        required=True,
        help="torchvision vgg19 state_dict file (vgg19-dcbb9e9d.pth); never downloaded",
    )
    parser.add_argument(
        "--out", type=output_file, required=True, help="where to write the result (PNG/JPEG)"
    )
    parser.add_argument("--steps", type=positive_int, default=300)
    parser.add_argument(
        "--size",
        type=positive_int,
        default=256,
        help="longer side of the content image, in pixels; the style image is resized to match",
    )
    parser.add_argument("--method", choices=("adam", "lbfgs"), default="adam")
    parser.add_argument(
        "--lr",
        type=non_negative_float,
        default=None,
        help="default: 0.02 for adam, 1.0 for lbfgs",
    )
    parser.add_argument("--content-weight", type=non_negative_float, default=1.0)
    parser.add_argument("--style-weight", type=non_negative_float, default=1e6)
    parser.add_argument(
        "--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def _load_image(option: str, path: Path, size: tuple[int, int] | int, device: str) -> torch.Tensor:
    hint = "pass a PNG, JPEG or another image PIL reads"
    with failure(f"reading {option} {path}", hint), Image.open(path) as image:
        tensor = TF.to_tensor(image.convert("RGB"))
    if isinstance(size, int):
        h, w = tensor.shape[1:]
        scale = size / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
    resized = TF.resize(tensor, list(size), antialias=True).clamp(0.0, 1.0)
    return resized.unsqueeze(0).to(device)


def run(args: argparse.Namespace) -> int:
    # Check every input file before the (slow) weights load.
    for option, path in (("--content", args.content), ("--style", args.style)):
        if not path.is_file():
            raise FileNotFoundError(f"{option}: image file {str(path)!r} not found")
    with failure(
        f"reading --weights {args.weights}",
        "pass torchvision's vgg19 IMAGENET1K_V1 state_dict file (vgg19-dcbb9e9d.pth)",
    ):
        vgg, params, state = load_vgg19_features(args.weights, device=args.device)
    content = _load_image("--content", args.content, args.size, args.device)
    style = _load_image("--style", args.style, tuple(content.shape[2:]), args.device)
    loss = make_style_loss(
        vgg,
        params,
        state,
        content,
        style,
        content_weight=args.content_weight,
        style_weight=args.style_weight,
    )
    lr = args.lr if args.lr is not None else (0.02 if args.method == "adam" else 1.0)
    with tqdm(total=args.steps, desc="style", disable=args.no_progress) as bar:

        def progress(step: int, values: dict[str, float]) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4g}", style=f"{values['style']:.3g}")

        image = transfer(
            loss, content, steps=args.steps, lr=lr, method=args.method, progress=progress
        )
    with failure(f"writing --out {args.out}", "pick a writable .png or .jpg path"):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        TF.to_pil_image(image[0].cpu()).save(args.out)
    height, width = image.shape[2:]
    print(f"wrote {args.out} ({width}x{height}) after {args.steps} {args.method} steps")
    return 0
