"""``functorch-diary export CKPT --out model.pt``: a checkpoint's weights as a plain
``state_dict`` for the ``nn.Module`` twin (``.pt`` through ``torch.save``, or
``.safetensors`` through the ``safetensors`` package).

The file holds exactly ``module.state_dict()``'s keys, in order, as contiguous CPU
tensors: ``net.load_state_dict(torch.load("model.pt"))`` (or
``safetensors.torch.load_file``) gives the network the checkpoint's outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import output_file
from .errors import CliError, failure
from .runs import find_checkpoint, restore

FORMATS = (".pt", ".pth", ".safetensors")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint's weights as a plain state_dict (.pt or .safetensors)",
        description="Write the weights of a train checkpoint (or a run folder's best) as the "
        "nn.Module's state_dict, loadable with load_state_dict.",
    )
    parser.add_argument("checkpoint", type=Path, help="a .ckpt file or a train --out folder")
    parser.add_argument(
        "--out", type=output_file, required=True, help="model.pt, model.pth or model.safetensors"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.out.suffix not in FORMATS:
        raise CliError(f"--out {args.out}: unknown format {args.out.suffix!r}; end the name "
                       f"with one of {', '.join(FORMATS)}")  # fmt: skip
    path = find_checkpoint("checkpoint", args.checkpoint, which="best")
    recipe, ts, _ = restore("checkpoint", path, "cpu")
    model = recipe.build_model()
    state_dict = {k: v.detach().contiguous().clone()
                  for k, v in model.state_dict(ts.params, ts.state).items()}  # fmt: skip
    with failure(f"writing --out {args.out}", "pick a writable path", OSError):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.suffix == ".safetensors":
            from safetensors.torch import save_file  # imported only for this format

            save_file(state_dict, str(args.out), metadata={"recipe": recipe.name})
        else:
            import torch

            torch.save(state_dict, args.out)
    print(f"wrote {args.out}: {len(state_dict)} tensors of {recipe.name} from {path}")
    return 0
