"""Command line: argument parsing only; validated configs go to `fastkd.commands` and friends.

User errors (`FastkdError`) print one line and exit with code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from fastkd.errors import ConfigError, FastkdError

if TYPE_CHECKING:
    from fastkd.loop import Interrupted


def _add_config_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--config", required=required, metavar="YAML", help="run configuration")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optim.lr=0.05 run.name=try2")


class _Version(argparse.Action):
    """`--version`: imports torch only when asked (the versions are its libraries')."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print fastkd's version and git revision, torch, torchvision and DALI versions, "
                              "and whether CUDA is available, then exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        from fastkd.env import version_text

        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastkd", description="Fast knowledge distillation for image classifiers.")
    parser.add_argument("-V", "--version", action=_Version)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                        help="messages shown (logger 'fastkd'; progress bars and results are not messages): "
                             "warning keeps warnings and errors only (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model with labels")
    _add_config_args(train)
    train.add_argument("--resume", action="store_true", help="continue the run in its run directory")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    distill = commands.add_parser("distill", help="train a student against a frozen teacher")
    _add_config_args(distill)
    distill.add_argument("--resume", action="store_true", help="continue the run in its run directory")
    distill.add_argument("--no-progress", action="store_true", help="no progress bar")

    cache = commands.add_parser("teacher-cache", help="record the teacher's logits on the training crops, once "
                                "for every student (distill.teacher_cache)")
    _add_config_args(cache)
    cache.add_argument("--epochs", type=int, help="epochs to record (default optim.epochs); recorded ones are kept")
    cache.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16",
                       help="storage of the logits (fp32: bit-exact replay)")
    cache.add_argument("--top-k", type=int, metavar="K",
                       help="keep each sample's K largest logits and one rest logit instead of all (default: "
                            "distill.teacher_cache_top_k; a replay needs that key set to the same K)")
    cache.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = commands.add_parser("eval", help="val top-1/top-5 of a checkpoint")
    evaluate.add_argument("--checkpoint", required=True, type=Path)
    evaluate.add_argument("--arch", help="model builder for a plain state_dict (default: model.arch)")
    evaluate.add_argument("--ema", action="store_true",
                          help="the checkpoint's EMA weights (best_ema.pt or last.pt of a run with model.ema_decay)")
    _add_config_args(evaluate)

    bench = commands.add_parser("bench", help="images/second of loaders, training and distillation per backend")
    _add_config_args(bench)
    bench.add_argument("--what", default="loader,train,distill",
                       help="comma list of loader, loader-stages, train, distill, distill-cached (the student against "
                       "a teacher cache: no teacher forward), settings (the student's step with bf16, with "
                       "runtime.compile and, on the CPU, with the other torch thread count, beside the configured "
                       "one: ratio and compile time)")
    bench.add_argument("--backends", default="torchvision,dali-cpu,dali-gpu,synthetic",
                       help="comma list of torchvision, dali-cpu, dali-gpu, synthetic")
    bench.add_argument("--steps", type=int, default=20, help="batches per timed window")
    bench.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    bench.add_argument("--repeats", type=int, default=3, help="timed windows (median and spread)")
    bench.add_argument("--out", type=Path, help="append rows to this JSONL file")
    bench.add_argument("--image-sizes", default="",
                       help="comma list of training sizes to measure in turn (default: data.image_size), e.g. "
                            "160,192,224 to predict the time a size schedule saves")

    report = commands.add_parser("report", help="one table and plots of finished runs")
    report.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN",
                        help="run folders, or folders holding runs (runs/demo); what is not a finished run is "
                             "skipped with a note")
    report.add_argument("--out", type=Path, default=Path("report.md"), help="markdown file; PNGs go beside it")

    demo = commands.add_parser("demo", help="teacher, student alone, student distilled on the demo data")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for the demo's runs")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0],
                      help="student seeds, e.g. 0 1 2 for a spread over seeds (default: %(default)s)")
    demo.add_argument("--configs", type=Path, help="folder with teacher/student/distill.yaml (default configs/demo)")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--no-teacher-cache", action="store_true",
                      help="run the teacher live in every distillation (default: record it once, replay it)")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for all three configs")

    export = commands.add_parser("export", help="write a run's student as a torchvision state_dict (+ ONNX)")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--out", type=Path, required=True, help="state_dict path, e.g. student.pt")
    export.add_argument("--checkpoint", choices=["best", "last", "best-ema"], default="best",
                        help="best.pt, last.pt, or the EMA weights of best_ema.pt (model.ema_decay)")
    export.add_argument("--onnx", action="store_true", help="also write OUT with .onnx, checked with onnxruntime")

    data = commands.add_parser("data", help="dataset tools")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="TOOL")
    synth = data_commands.add_parser("synth", help="write the built-in demo dataset (ImageFolder layout)")
    synth.add_argument("out", type=Path)
    synth.add_argument("--train-per-class", type=int, default=100)
    synth.add_argument("--val-per-class", type=int, default=30)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, help="processes (default: one per CPU core)")

    mini = data_commands.add_parser("mini-imagenet", help="write the original project's 480/120 split "
                                    "(new_train.csv, new_val.csv, classes_name.json) into ROOT")
    mini.add_argument("root", type=Path, help="folder with images/, train.csv, val.csv, test.csv")
    mini.add_argument("--class-index", type=Path, help="imagenet_class_index.json for human-readable names")

    verify = data_commands.add_parser("verify", help="decode every image of a dataset; list the broken ones")
    verify.add_argument("root", type=Path)
    verify.add_argument("--format", choices=["imagefolder", "mini-imagenet", "filelist"], default="imagefolder")
    verify.add_argument("--train-dir", default="train", help="imagefolder format: training folder under ROOT")
    verify.add_argument("--val-dir", default="val", help="imagefolder format: validation folder (CIFAR-10: test)")
    verify.add_argument("--train-list", default="train.txt", help="filelist format: training list")
    verify.add_argument("--val-list", default="val.txt", help="filelist format: validation list")
    verify.add_argument("--classes-file", default="classes.txt", help="filelist format: class names")
    verify.add_argument("--workers", type=int, help="decoding processes (default: one per CPU core)")
    verify.add_argument("--write-clean-list", type=Path, metavar="FILE",
                        help="write FILE (train), its .val and .classes twins without the broken files")

    config = commands.add_parser("config", help="show a resolved config, or the reference of all keys")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="WHAT")
    _add_config_args(config_commands.add_parser("show", help="print the resolved config (with overrides)"))
    config_commands.add_parser("reference", help="print the reference of every key (markdown)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, `key=value` overrides accepted anywhere after the command (argparse takes
    one run of positionals: the overrides after an option are gathered here, in order)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [item for item in rest if "=" in item and not item.startswith("-")]
    unknown = [item for item in rest if item not in overrides]
    if overrides and not hasattr(args, "overrides"):
        unknown = rest
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import logging

    from fastkd.log import log

    from fastkd.loop import Interrupted

    log.setLevel(getattr(logging, args.log_level.upper()))
    try:
        _dispatch(args)
    except Interrupted as stop:
        _exit_interrupted(stop, args.command, list(sys.argv[1:] if argv is None else argv))
    except FastkdError as exc:
        if args.debug:
            raise
        print(f"fastkd: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("fastkd: aborted", file=sys.stderr)
        sys.exit(130)


STOPPABLE = ("train", "distill", "teacher-cache", "demo")
"""The commands that train or record: SIGTERM/SIGINT stop them cleanly, with the command that goes on."""


def _dispatch(args: argparse.Namespace) -> None:
    if args.command in STOPPABLE:
        from fastkd.loop import StopFlag, stop_on_signals

        # Open from the start: a stop requested while a run is being built (data, models, DALI
        # pipelines) is honoured at its first step instead of killing the process midway.
        with stop_on_signals(StopFlag()):
            _dispatch_command(args)
    else:
        _dispatch_command(args)


def _dispatch_command(args: argparse.Namespace) -> None:
    from fastkd.config import load_config

    if args.command in ("train", "distill"):
        from fastkd import commands

        cfg = load_config(args.config, args.overrides)
        run = commands.train if args.command == "train" else commands.distill
        result = run(cfg, resume=args.resume, progress=not args.no_progress)
        if result.is_main:
            _print_summary(result.run_dir, result.summary)
    elif args.command == "teacher-cache":
        from fastkd import commands
        from fastkd.teacher_cache import describe_top_k

        cfg = load_config(args.config, args.overrides)
        done = commands.record_teacher_cache(cfg, epochs=args.epochs, dtype=args.dtype, top_k=args.top_k,
                                           progress=not args.no_progress)
        if int(os.environ.get("RANK", "0")) == 0:
            recorded = f"recorded epochs {', '.join(map(str, done['recorded_now']))}" if done["recorded_now"] else \
                "nothing to record"
            print(f"teacher cache {done['path']}: {recorded}; epochs 0-{done['epochs'] - 1} of {done['num_samples']} "
                  f"samples in {done['dtype']}, {describe_top_k(done['top_k'])} (teacher val top1 "
                  f"{done['teacher']['val_top1']:.2f})")
    elif args.command == "eval":
        from fastkd import commands

        cfg = load_config(args.config, args.overrides)
        metrics = commands.evaluate_checkpoint(cfg, args.checkpoint, arch=args.arch, ema=args.ema)
        print(f"{metrics['arch']} {args.checkpoint}: val top1 {metrics['top1']:.2f}  top5 {metrics['top5']:.2f}  "
              f"loss {metrics['loss']:.4f}  ({metrics['count']} images)")
    elif args.command == "bench":
        from fastkd.bench import Window, run_bench

        if min(args.steps, args.repeats) < 1 or args.warmup < 0:
            raise FastkdError("--steps and --repeats must be >= 1, --warmup >= 0")
        cfg = load_config(args.config, args.overrides)
        sizes = [item.strip() for item in args.image_sizes.split(",") if item.strip()]
        if not all(size.isdigit() for size in sizes):
            raise ConfigError(f"--image-sizes: expected a comma list of pixel sizes, got {args.image_sizes!r}")
        # Every size's config is checked before anything runs (a bad size writes no rows); the
        # validation sizes follow each (the bench times no validation).
        configs = [load_config(args.config, [*args.overrides, f"data.image_size={size}", "data.size_schedule=null",
                                             "data.val_image_size=null", "data.val_resize=null"])
                   for size in sizes] or [cfg]
        for sized in configs:
            run_bench(sized, config_path=args.config, what=[w for w in args.what.split(",") if w],
                      backends=[b for b in args.backends.split(",") if b],
                      window=Window(steps=args.steps, warmup=args.warmup, repeats=args.repeats), out=args.out)
    elif args.command == "report":
        from fastkd.report import write_report

        path = write_report(args.run_dirs, args.out)
        print(path.read_text())
    elif args.command == "demo":
        from fastkd.demo import run_demo

        demo = run_demo(args.out, seeds=args.seeds, overrides=args.overrides, configs=args.configs,
                        progress=not args.no_progress, teacher_cache=not args.no_teacher_cache)
        print(f"\n{demo['table']}\n\n{demo['verdict']}\n(written to {args.out / 'demo.md'})")
    elif args.command == "export":
        from fastkd.export import export_student

        meta = export_student(args.run_dir, args.out, checkpoint=args.checkpoint, onnx=args.onnx)
        written = [args.out, args.out.with_suffix(".json")] + ([args.out.with_suffix(".onnx")] if args.onnx else [])
        check = f" (ONNX max |diff| vs PyTorch {meta['onnx_max_abs_diff']:.1e})" if args.onnx else ""
        print(f"exported {meta['arch']} ({meta['num_classes']} classes, val top1 {meta['best_top1']:.2f}) to "
              f"{', '.join(map(str, written))}{check}")
    elif args.command == "data":
        if args.data_command == "synth":
            from fastkd.synth import DemoSpec, generate_demo_dataset

            spec = DemoSpec(train_per_class=args.train_per_class, val_per_class=args.val_per_class, seed=args.seed)
            if args.out.exists() and any(args.out.iterdir()):
                raise FastkdError(f"output folder is not empty: {args.out}")
            generate_demo_dataset(args.out, spec, workers=args.workers)
            print(f"wrote {len(spec.classes)} classes x ({spec.train_per_class} train + {spec.val_per_class} val) "
                  f"images to {args.out}")
        elif args.data_command == "mini-imagenet":
            from pipelines.mini_imagenet import read_class_index, split_mini_imagenet

            names = read_class_index(args.class_index) if args.class_index else None
            counts = split_mini_imagenet(args.root, names)
            print(f"wrote new_train.csv ({counts['train']} images), new_val.csv ({counts['val']}) and "
                  f"classes_name.json ({counts['classes']} classes) into {args.root}")
        elif args.data_command == "verify":
            _verify(args)
    elif args.command == "config":
        from fastkd.config import dump_config, reference_markdown

        if args.config_command == "reference":
            print(reference_markdown())
        else:
            print(dump_config(load_config(args.config, args.overrides)), end="")


def _verify(args: argparse.Namespace) -> None:
    from fastkd.env import cpu_count
    from pipelines.datasets import load_dataset
    from pipelines.verify import find_broken_images, write_clean_lists

    dataset = load_dataset(args.format, args.root, train_list=args.train_list, val_list=args.val_list,
                           classes_file=args.classes_file, train_dir=args.train_dir, val_dir=args.val_dir)
    files = dataset.train.files + dataset.val.files
    broken = find_broken_images(files, root=args.root, workers=args.workers or cpu_count(), use_cache=False)
    for item in broken:
        print(f"{item.path}: {item.reason}")
    if args.write_clean_list:
        written = [p.resolve() for p in write_clean_lists(dataset, broken, args.root, args.write_clean_list)]
        print(f"wrote {', '.join(map(str, written))}; train on them with data.format=filelist "
              f"data.root={args.root} data.train_list={written[0]} data.val_list={written[1]} "
              f"data.classes_file={written[2]}")
    print(f"{len(files) - len(broken)} of {len(files)} images decode; {len(broken)} cannot", file=sys.stderr)
    if broken:
        sys.exit(1)


def _print_summary(run_dir: Path, summary: dict) -> None:
    keys = ("best_val_top1", "best_val_top5", "final_val_top1", *(["best_ema_val_top1"] if "best_ema_val_top1" in summary
                                                                   else []),
            "train_val_gap", "images_per_sec", "wall_seconds")
    print(f"run {run_dir}: " + "  ".join(f"{k} {summary.get(k)}" for k in keys))


def _exit_interrupted(stop: "Interrupted", command: str, argv: list[str]) -> None:
    """The one-line account of a clean stop and the command that goes on, then exit 128 + signal
    (as a shell reports a process ended by that signal)."""
    again = list(argv)
    if command in ("train", "distill"):
        how = "resume with"
        if "--resume" not in again:
            again.insert(again.index(command) + 1, "--resume")
    elif command == "teacher-cache":
        how = "record the rest with the same command"
    else:
        how = "go on with the same command (finished runs are reused, a stopped one resumes)"
    if int(os.environ.get("RANK", "0")) == 0:
        launcher = ("torchrun <same options> -m fastkd" if int(os.environ.get("WORLD_SIZE", "1")) > 1
                    else "fastkd")
        name = signal.Signals(stop.signum).name if stop.signum else "a stop request"
        print(f"fastkd: stopped by {name}; kept {stop.kept}; {how}:\n  {launcher} {shlex.join(again)}",
              file=sys.stderr)
    sys.exit(128 + (stop.signum or 15))

if __name__ == "__main__":
    main()
