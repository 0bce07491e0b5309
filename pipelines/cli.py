"""The ``anomaly-forge`` console script.

Commands: ``demo`` (whole lineage on the embedded data), ``add-category`` (new partition + one asset backfill of
its lineage on the instance in ``$DAGSTER_HOME``, executed by the daemon; ``--in-process`` runs it here instead),
``materialize`` (the lineage for existing partitions), ``list-methods``.

Choices:
- ``add-category`` and ``materialize`` need ``DAGSTER_HOME`` (runs must land in the instance the UI reads); they
  refuse to run without it instead of writing to a throw-away instance.
- ``add-category --root DIR`` adds DIR to the dataset roots for this command only; to let later ingest runs
  (UI, sensor) find the category, DIR must also be in ``ANOMALY_FORGE_DATASETS`` (the command says so).
- Dagster's beta/preview warnings about the partition mapping and partitioned checks this project relies on
  (on a pinned Dagster) are silenced here; library users still see them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _instance():
    import dagster as dg

    home = os.environ.get("DAGSTER_HOME")
    if not home or not Path(home).is_dir():
        raise SystemExit("DAGSTER_HOME is not set to an existing folder: point it at your Dagster instance "
                         "(e.g. `export DAGSTER_HOME=$PWD/demo_out/dagster_home` after `anomaly-forge demo`)")
    return dg.DagsterInstance.get()


def _json_settings(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--settings is not valid JSON ({e}); e.g. --settings "
                         f"'{{\"detection_options\": {{\"detectors\": [\"segmenter\"]}}}}'") from None
    if not isinstance(value, dict):
        raise SystemExit("--settings must be a JSON object of ForgeSettings fields")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    return run_demo(args.out, methods=_csv(args.methods), categories=_csv(args.categories), n=args.n,
                    size=args.size, seed=args.seed, settings=_json_settings(args.settings))


def cmd_train_base(args: argparse.Namespace) -> int:
    from ops.forge_base.train import BaseTrainConfig, train_base

    cfg = BaseTrainConfig(pool_size=args.pool_size, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                          vae_batch=args.vae_batch, unet_batch=args.unet_batch, seed=args.seed, dtype=args.dtype)
    try:
        cfg.check()
    except ValueError as e:
        raise SystemExit(str(e)) from None
    command = ("anomaly-forge train-base --out DIR " + " ".join(
        f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("pool_size", "vae_steps", "unet_steps", "vae_batch",
                                                                "unet_batch", "seed", "dtype")))
    train_base(args.out, cfg, command=command)
    return 0


def cmd_list_methods(_args: argparse.Namespace) -> int:
    from ops.methods.registry import BASELINES, available_methods, get_method

    for name in available_methods():
        method = get_method(name)
        doc = (type(method).__doc__ or "").strip().splitlines()
        kind = "baseline" if name in BASELINES else "diffusion" if method.needs_backbone else "method"
        print(f"{name:<16} {kind:<10} {doc[0] if doc else ''}")
    return 0


def _run(categories: Sequence[str], methods: Sequence[str] | None, extra_roots: Sequence[str] = ()) -> int:
    from ops.methods.registry import available_methods
    from pipelines.definitions import build_definitions
    from pipelines.demo import run_lineage
    from resources.settings import ForgeSettings

    roots = list(ForgeSettings.from_env().dataset_roots) + [str(Path(r).resolve()) for r in extra_roots]
    defs = build_definitions(dataset_roots=list(dict.fromkeys(roots)))
    with _instance() as instance:
        steps = run_lineage(defs, instance, categories, list(methods or available_methods()),
                            tags={"anomaly_forge/trigger": "cli"})
    failed = [s for s in steps if s.status != "ok"]
    print(f"{len(steps) - len(failed)}/{len(steps)} steps ok")
    return 1 if failed else 0


def cmd_add_category(args: argparse.Namespace) -> int:
    from assets.ingest import find_categories

    found = find_categories([args.root])
    if args.name not in found:
        raise SystemExit(f"{args.root} has no category folder {args.name!r} with a known layout; found: "
                         f"{sorted(found) or 'none'}")
    with _instance() as instance:
        if instance.has_dynamic_partition("category", args.name):
            print(f"category {args.name!r} is already a partition")
        else:
            instance.add_dynamic_partitions("category", [args.name])
            print(f"added category partition {args.name!r}")
    roots = os.environ.get("ANOMALY_FORGE_DATASETS", "").split(os.pathsep)
    if str(Path(args.root).resolve()) not in [str(Path(r).resolve()) for r in roots if r]:
        print(f"note: add {Path(args.root).resolve()} to ANOMALY_FORGE_DATASETS so later ingest runs find it")
    if args.no_run:
        return 0
    if args.in_process:
        return _run([args.name], _csv(args.methods), extra_roots=[args.root])
    return _submit_backfill(args.name, _csv(args.methods), args.root)


def _submit_backfill(category: str, methods: Sequence[str] | None, root: str) -> int:
    """One asset backfill of the category's lineage, stored in the instance for the daemon to execute."""
    from pipelines.backfill import submit_backfill
    from pipelines.definitions import build_definitions
    from resources.settings import ForgeSettings

    settings = ForgeSettings.from_env()
    methods = list(methods or settings.active_methods())
    defs = build_definitions(dataset_roots=list(dict.fromkeys([*settings.dataset_roots, str(Path(root).resolve())])))
    with _instance() as instance:
        backfill_id = submit_backfill(instance, defs.get_repository_def().asset_graph, category, methods,
                                      trigger="cli")
    print(f"backfill {backfill_id}: the lineage of {category!r} for methods {', '.join(methods)}; the Dagster "
          f"daemon executes it (`dagster dev` or `dagster-daemon run`) and the UI shows it under Backfills")
    return 0


def cmd_materialize(args: argparse.Namespace) -> int:
    with _instance() as instance:
        existing = list(instance.get_dynamic_partitions("category"))
    categories = _csv(args.categories) or existing
    missing = sorted(set(categories) - set(existing))
    if missing or not categories:
        raise SystemExit(f"categories {missing or '(none)'} are not partitions of this instance; add them first "
                         f"(anomaly-forge add-category NAME --root DIR); existing: {existing}")
    return _run(categories, _csv(args.methods))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomaly-forge", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole lineage on the embedded demo dataset")
    demo.add_argument("--out", default="demo_out", help="output folder (data/, storage/, dagster_home/, report.md)")
    demo.add_argument("--methods", help="comma-separated methods (default: all registered)")
    demo.add_argument("--categories", help="comma-separated demo categories (default: all)")
    demo.add_argument("--n", type=int, default=16, help="synthetic images per category x method (default 16)")
    demo.add_argument("--size", type=int, default=128, help="demo image size in pixels (default 128)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--settings", help="JSON object of further ForgeSettings fields, e.g. "
                                         "'{\"detection_options\": {\"detectors\": [\"segmenter\"]}}'")
    demo.set_defaults(func=cmd_demo)

    add = sub.add_parser("add-category", help="add a category partition and backfill its lineage")
    add.add_argument("name")
    add.add_argument("--root", required=True, help="dataset root that contains the category folder")
    add.add_argument("--methods", help="comma-separated methods (default: ForgeSettings.methods / "
                                       "ANOMALY_FORGE_METHODS, else all registered)")
    add.add_argument("--no-run", action="store_true", help="only add the partition")
    add.add_argument("--in-process", action="store_true",
                     help="run the lineage here, stage by stage, instead of submitting one backfill to the daemon")
    add.set_defaults(func=cmd_add_category)

    mat = sub.add_parser("materialize", help="materialize the lineage for existing category partitions")
    mat.add_argument("--categories", help="comma-separated categories (default: every partition)")
    mat.add_argument("--methods", help="comma-separated methods (default: all registered)")
    mat.set_defaults(func=cmd_materialize)

    base = sub.add_parser("train-base", help="train the forge-base diffusion model into a diffusers folder "
                                             "(resumes an interrupted run from OUT/.train)")
    base.add_argument("--out", required=True, help="output folder (diffusers layout; checkpoints in OUT/.train)")
    defaults = __import__("ops.forge_base.train", fromlist=["BaseTrainConfig"]).BaseTrainConfig()
    for name in ("pool_size", "vae_steps", "unet_steps", "vae_batch", "unet_batch", "seed"):
        base.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name),
                          help=f"default {getattr(defaults, name)}")
    base.add_argument("--dtype", default=defaults.dtype, choices=("float16", "float32"),
                      help="dtype of the saved weights (training is float32)")
    base.set_defaults(func=cmd_train_base)

    lst = sub.add_parser("list-methods", help="list the registered generation methods")
    lst.set_defaults(func=cmd_list_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import dagster as dg

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
