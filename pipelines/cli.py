"""The ``anomaly-forge`` console script.

Commands: ``demo`` (whole lineage on the embedded data), ``add-category`` (new partition + one asset backfill of
its lineage on the instance in ``$DAGSTER_HOME``, executed by the daemon; ``--in-process`` runs it here instead),
``materialize`` (the lineage for existing partitions), ``list-methods``, ``train-base`` (train forge-base),
``export`` (a partition's synthetic data as an MVTec AD tree), ``predict`` (score images with an exported detector).

Choices:
- ``add-category`` and ``materialize`` need ``DAGSTER_HOME`` (runs must land in the instance the UI reads); they
  refuse to run without it instead of writing to a throw-away instance.
- ``add-category --root DIR`` adds DIR to the dataset roots for this command only; to let later ingest runs
  (UI, sensor) find the category, DIR must also be in ``ANOMALY_FORGE_DATASETS`` (the command says so).
- Every argument is checked before any work (``pipelines.usage``); a user error is one line on stderr and exit
  status 2, with its traceback only under ``--debug``. Any other exception is a bug and keeps its traceback.
- Dagster's beta/preview warnings about the partition mapping and partitioned checks this project relies on
  (on a pinned Dagster) are silenced here; library users still see them.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

from pipelines import usage


def _instance():
    import dagster as dg

    home = os.environ.get("DAGSTER_HOME")
    if not home or not Path(home).is_dir():
        raise usage.UsageError("DAGSTER_HOME is not set to an existing folder: point it at your Dagster instance "
                               "(e.g. `export DAGSTER_HOME=$PWD/demo_out/dagster_home` after `anomaly-forge demo`)")
    return dg.DagsterInstance.get()


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    methods = usage.methods(args.methods)
    categories = usage.demo_categories(args.categories)
    usage.at_least(args.n, 1, "--n", "synthetic images per category x method")
    usage.at_least(args.size, 32, "--size", "defects are a few pixels wide")
    usage.at_least(args.seed, 0, "--seed")
    settings = usage.settings_json(args.settings)
    usage.settings(settings, dataset_roots=[str(Path(args.out).expanduser().resolve() / "data")],
                   n_per_partition=args.n, seed=args.seed)
    return run_demo(args.out, methods=methods, categories=categories, n=args.n, size=args.size, seed=args.seed,
                    settings=settings)


def cmd_train_base(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from ops.forge_base.train import BaseTrainConfig, train_base

    names = [f.name for f in fields(BaseTrainConfig)]
    given = {k: getattr(args, k) for k in names if k != "recipe" and getattr(args, k) is not None}
    cfg = BaseTrainConfig.for_recipe(args.recipe, **given)
    try:
        cfg.check()
    except ValueError as e:
        raise usage.UsageError(str(e)) from None
    command = "anomaly-forge train-base --out DIR " + " ".join(
        f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in names)
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
    from pipelines.demo import NOT_APPLICABLE, failures, run_lineage
    roots = list(usage.settings({}, "the environment (ANOMALY_FORGE_*)").dataset_roots) + list(extra_roots)
    defs = build_definitions(dataset_roots=list(dict.fromkeys(roots)))
    with _instance() as instance:
        steps = run_lineage(defs, instance, categories, list(methods or available_methods()),
                            tags={"anomaly_forge/trigger": "cli"})
    failed = failures(steps)
    na = sum(s.status == NOT_APPLICABLE for s in steps)
    print(f"{len(steps) - len(failed) - na}/{len(steps)} steps ok" + (f", {na} n/a (see above)" if na else ""))
    return 1 if failed else 0


def cmd_add_category(args: argparse.Namespace) -> int:
    from assets.ingest import find_categories
    from ops.ingest.image_level import NAME as IMAGE_LEVEL

    usage.category_name(args.name)
    root = usage.folder(args.root, "--root")
    methods = usage.methods(args.methods)
    try:
        found = find_categories([str(root)])
    except ValueError as e:
        raise usage.UsageError(f"--root {root}: {e}") from None
    if args.name not in found:
        raise usage.UsageError(f"{root} has no category folder {args.name!r} with a known layout; found: "
                               f"{sorted(found) or 'none'}")
    with _instance() as instance:
        if instance.has_dynamic_partition("category", args.name):
            print(f"category {args.name!r} is already a partition")
        else:
            instance.add_dynamic_partitions("category", [args.name])
            print(f"added category partition {args.name!r}")
    from resources.settings import split_roots

    roots = split_roots(os.environ.get("ANOMALY_FORGE_DATASETS", ""))
    if _canonical(str(root)) not in [_canonical(r) for r in roots]:
        print(f"note: add {root} to ANOMALY_FORGE_DATASETS so later ingest runs find it")
    if found[args.name][1] == IMAGE_LEVEL:
        methods = _mask_free(args.name, root, methods)
    if args.no_run:
        return 0
    if args.in_process:
        return _run([args.name], methods, extra_roots=[str(root)])
    return _submit_backfill(args.name, methods, str(root))


def _canonical(root: str) -> str:
    from ops.cache import is_remote

    return root.rstrip("/") if is_remote(root) else str(Path(root).resolve())


def _mask_free(category: str, root: Path, methods: Sequence[str] | None) -> list[str]:
    """Say in one line what runs on an image-level-only category; the methods that can (an error if none)."""
    from ops.image_level import plan, summary_line
    from resources.settings import ForgeSettings

    asked = list(methods or ForgeSettings.from_env().active_methods())
    from ops.cache import is_remote

    test = None if is_remote(str(root)) else Path(root) / category / "test"  # remote: the line names no types
    types = sorted(p.name for p in test.iterdir() if p.is_dir() and p.name != "good") if test else []
    print(summary_line(category, types, asked))
    run, _ = plan(asked)
    if not run:
        raise usage.UsageError(f"--methods {','.join(asked)}: none of them runs on {category!r} (image-level labels "
                               f"only, no masks); add a mask-free method such as perlin")
    return run


def _submit_backfill(category: str, methods: Sequence[str] | None, root: str) -> int:
    """One asset backfill of the category's lineage, stored in the instance for the daemon to execute."""
    from pipelines.backfill import submit_backfill
    from pipelines.definitions import build_definitions
    from resources.settings import ForgeSettings

    settings = ForgeSettings.from_env()
    methods = list(methods or settings.active_methods())
    defs = build_definitions(dataset_roots=list(dict.fromkeys([*settings.dataset_roots, _canonical(root)])))
    with _instance() as instance:
        backfill_id = submit_backfill(instance, defs.get_repository_def().asset_graph, category, methods,
                                      trigger="cli")
    print(f"backfill {backfill_id}: the lineage of {category!r} for methods {', '.join(methods)}; the Dagster "
          f"daemon executes it (`dagster dev` or `dagster-daemon run`) and the UI shows it under Backfills")
    return 0


def cmd_materialize(args: argparse.Namespace) -> int:
    methods = usage.methods(args.methods)
    with _instance() as instance:
        existing = list(instance.get_dynamic_partitions("category"))
    categories = usage.csv(args.categories) or existing
    missing = sorted(set(categories) - set(existing))
    if missing or not categories:
        raise usage.UsageError(f"categories {missing or '(none)'} are not partitions of this instance; add them "
                               f"first (anomaly-forge add-category NAME --root DIR); existing: {existing}")
    return _run(categories, methods)


def _storage(root: str | None):
    from ops.storage import Storage
    from resources.storage import storage_root_from_env

    return Storage(root or storage_root_from_env())


def cmd_export(args: argparse.Namespace) -> int:
    from ops.export import export_mvtec

    try:
        target = export_mvtec(_storage(args.storage), args.category, args.method, args.out, mask=args.mask,
                              overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"export: {e}") from None
    print(f"wrote {target} (MVTec AD layout: train/good, test/<defect type>, ground_truth/<defect type>)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ops.detection.deploy import predict
    from ops.viz import markdown_table

    try:
        df = predict(args.detector, args.images, fmt=args.format)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"predict: {e}") from None
    if args.out:
        df.to_csv(args.out, index=False)
    print(markdown_table(df, max_rows=len(df)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomaly-forge", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole lineage on the embedded demo dataset")
    demo.add_argument("--out", default="demo_out", help="output folder (data/, storage/, dagster_home/, report.md)")
    demo.add_argument("--methods", help="comma-separated methods (default: all registered)")
    demo.add_argument("--categories", help="comma-separated demo categories: brick, grass, gravel (default: brick, "
                                           "which keeps the demo within 10 minutes on a 2-core CPU)")
    from ops.demo_data import DEMO_N

    demo.add_argument("--n", type=int, default=DEMO_N,
                      help=f"synthetic images per category x method (default {DEMO_N})")
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
    from dataclasses import fields

    from ops.forge_base.train import BaseTrainConfig

    from ops.forge_base.train import RECIPE_DEFAULTS

    defaults = BaseTrainConfig()
    base.add_argument("--recipe", default=defaults.recipe, choices=sorted(RECIPE_DEFAULTS),
                      help="data and schedule recipe; its values are the defaults of the flags below (v1: the "
                           "shipped weights; v2: " + ", ".join(f"{k} {v}" for k, v in RECIPE_DEFAULTS["v2"].items())
                           + ")")
    for f in fields(BaseTrainConfig):
        value = getattr(defaults, f.name)
        if f.name in ("dtype", "precision", "recipe"):
            continue
        base.add_argument("--" + f.name.replace("_", "-"), type=type(value), default=None,
                          help=f"default {value} (v1)")
    base.add_argument("--precision", default=None, choices=("bf16", "float32"),
                      help="training arithmetic: bf16 autocast (fp32 master weights) or plain float32 (default)")
    base.add_argument("--dtype", default=None, choices=("float16", "float32"),
                      help="dtype of the saved weights (default float16)")
    base.set_defaults(func=cmd_train_base)

    lst = sub.add_parser("list-methods", help="list the registered generation methods")
    lst.set_defaults(func=cmd_list_methods)

    exp = sub.add_parser("export", help="write a category x method partition's synthetic data as an MVTec AD tree")
    exp.add_argument("--category", required=True)
    exp.add_argument("--method", required=True)
    exp.add_argument("--out", required=True, help="dataset root to write; the tree goes to OUT/<category>")
    exp.add_argument("--mask", choices=["final", "method"], default="final",
                     help="final = refined mask the detectors train on (default); method = the method's own mask")
    exp.add_argument("--storage", help="storage root (default: $ANOMALY_FORGE_STORAGE or $ANOMALY_FORGE_HOME/storage)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing OUT/<category>")
    exp.set_defaults(func=cmd_export)

    pred = sub.add_parser("predict", help="score images with a deployed detector (asset deployed_detector)")
    pred.add_argument("--detector", required=True,
                      help="deploy folder <storage root>/detectors/<category>/<method>/deploy or its deploy.json")
    pred.add_argument("--format", choices=["torch", "onnx"], default="torch", help="which export to run (default torch)")
    pred.add_argument("--out", help="also write the scores to this CSV file")
    pred.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    pred.set_defaults(func=cmd_predict)

    # --debug before or after the command name (SUPPRESS: a sub-parser must not reset the main parser's value)
    for p in [parser, *sub.choices.values()]:
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of user errors too")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import dagster as dg

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    # deprecation notices that anomalib / timm print on import are not the user's business (one-line errors)
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*(deprecated|will be removed)")
    try:
        return int(args.func(args) or 0)
    except (usage.UsageError, OSError) as e:
        line = str(e) if isinstance(e, usage.UsageError) else usage.environment_error(e)
        if line is None or getattr(args, "debug", False):
            raise
        print(f"anomaly-forge {args.command}: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
