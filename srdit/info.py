"""`srdit info NAME`: the resolved config of a preset and its parameter count."""
from __future__ import annotations

import argparse
import json

from srdit.config import get_config, list_presets, parse_overrides


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="preset / ablation name (omit to list them)")
    parser.add_argument("--registry", action="append", default=[], help="extra ablation registry YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key, e.g. --set model.depth=4")
    parser.add_argument("--json", action="store_true", help="print only the resolved config as JSON")
    parser.set_defaults(func=run)


def count_parameters(cfg) -> dict[str, int]:
    import torch
    from srdit.models import build_model

    with torch.device("meta"):          # no memory, no init cost: only shapes
        model = build_model(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    projector = sum(p.numel() for n, p in model.named_parameters() if n.startswith("projectors."))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "without_projector": total - projector, "projector": projector,
            "trainable": trainable}


def run(args) -> int:
    if not args.name:
        for name in list_presets(*args.registry):
            print(name)
        return 0
    cfg = get_config(args.name, *args.registry, overrides=parse_overrides(args.set))
    if args.json:
        print(cfg.to_json())
        return 0
    print(f"# {cfg.name}: {cfg.description}")
    print(json.dumps(cfg.to_dict(), indent=2))
    counts = count_parameters(cfg)
    print(f"parameters: {counts['total']:,} (sum over model.parameters(): projector and frozen "
          f"position table included)")
    print(f"  without REPA projector: {counts['without_projector']:,}; trainable: {counts['trainable']:,}")
    return 0
