"""The ``underfire`` command line.

Every user error (``UnderfireError``) is printed as one line on stderr with exit status 2; a
traceback means a bug in underfire.
"""

from __future__ import annotations

import functools
import inspect
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from .errors import InputError, ResizeNotice, UnderfireError

app = typer.Typer(
    name="underfire",
    help="ADV² attacks on interpretable deep learning systems: explain, attack, measure, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from .versions import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the underfire version and exit."),
    ] = False,
) -> None:
    """ADV² attacks on interpretable deep learning systems: explain, attack, measure, report."""


train_app = typer.Typer(help="Train the models underfire needs.", no_args_is_help=True)
data_app = typer.Typer(help="Work with datasets.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(data_app, name="data")

F = TypeVar("F", bound=Callable[..., Any])

ModelArg = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Model spec: shapes-resnet, shapes-densenet, PATH.safetensors, torchvision:NAME@WEIGHTS, torchscript:PATH, export:PATH.pt2, module:function.",
    ),
]
WeightsArg = Annotated[Optional[str], typer.Option("--weights", help="Local weights file for the model spec.")]
InputSizeArg = Annotated[
    Optional[int],
    typer.Option(
        "--input-size", help="Side length the model takes (images are resized to it).", rich_help_panel="Model metadata"
    ),
]
ChannelsArg = Annotated[
    Optional[int],
    typer.Option("--channels", help="Input channels: 3 (RGB) or 1 (grey).", rich_help_panel="Model metadata"),
]
MeanArg = Annotated[
    Optional[str],
    typer.Option(
        "--mean", help="Per-channel normalisation mean, e.g. 0.485,0.456,0.406.", rich_help_panel="Model metadata"
    ),
]
StdArg = Annotated[
    Optional[str],
    typer.Option(
        "--std", help="Per-channel normalisation std, e.g. 0.229,0.224,0.225.", rich_help_panel="Model metadata"
    ),
]
ClassesArg = Annotated[
    Optional[str],
    typer.Option(
        "--classes",
        help="Class names: a file (one per line) or names separated by commas.",
        rich_help_panel="Model metadata",
    ),
]
FeatureLayerArg = Annotated[
    Optional[str],
    typer.Option(
        "--feature-layer",
        help="Module name of the feature map CAM and Grad-CAM read.",
        rich_help_panel="Model metadata",
    ),
]
HeadArg = Annotated[
    Optional[str],
    typer.Option("--head", help="Module name of the linear head CAM reads.", rich_help_panel="Model metadata"),
]
RtsArg = Annotated[
    Optional[str],
    typer.Option(
        "--rts", help="RTS checkpoint trained for this model (underfire train rts).", rich_help_panel="Model metadata"
    ),
]

DeviceArg = Annotated[
    str,
    typer.Option(
        "--device", help="Where to compute: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N."
    ),
]
MaxMemoryArg = Annotated[
    Optional[str],
    typer.Option(
        "--max-memory",
        help="A memory budget such as 8GiB: the batch becomes the largest (up to the configured one) whose measured peak fits "
        "(bytes torch allocates on a GPU; this process's resident size on a CPU). Chosen at the first start; a resume keeps it.",
    ),
]

#: Where the CLI's model metadata is set, for the load check's messages.
MODEL_HINT = "or a model card NAME.toml beside the model file; underfire models --describe SPEC shows what is known"
InterpreterArg = Annotated[
    str, typer.Option("--interpreter", "-i", help="An interpreter name (underfire interpreters lists them).")
]
OptionArg = Annotated[
    Optional[list[str]],
    typer.Option(
        "--option", "-O", help="Interpreter option KEY=VALUE (repeatable; underfire interpreters --options lists them)."
    ),
]


def user_errors(command: F) -> F:
    """Turn ``UnderfireError`` into a one-line message and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            said: set[str] = set()  # each notice once per command (Python's "once" is once per process)
            warnings.simplefilter("always", ResizeNotice)
            warnings.showwarning = functools.partial(_show_notice, said)
            try:
                return command(*args, **kwargs)
            except UnderfireError as error:
                typer.echo(f"error: {error}", err=True)
                raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _show_notice(said: set[str], message: Warning | str, category: type[Warning], *rest: Any, **options: Any) -> None:
    """Notices for the user as one ``note:`` line, each once (``said``); other warnings as Python prints them."""
    if issubclass(category, ResizeNotice):
        if str(message) not in said:
            said.add(str(message))
            typer.echo(f"note: {message}", err=True)
    else:
        _PYTHON_SHOWWARNING(message, category, *rest, **options)


_PYTHON_SHOWWARNING = warnings.showwarning

#: The model metadata flags every command that takes --model has (``with_model_metadata``).
_METADATA_FLAGS: dict[str, Any] = {
    "input_size": InputSizeArg,
    "channels": ChannelsArg,
    "mean": MeanArg,
    "std": StdArg,
    "classes": ClassesArg,
    "feature_layer": FeatureLayerArg,
    "head": HeadArg,
    "rts": RtsArg,
}


def with_model_metadata(command: F) -> F:
    """Give ``command`` the model metadata flags (``--input-size``, ``--channels``, ...): they are
    added to its signature for typer and handed to it as one ``metadata`` dict of the given ones."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "metadata"]
    flags = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=kind)
        for name, kind in _METADATA_FLAGS.items()
    ]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        metadata = {name: kwargs.pop(name) for name in _METADATA_FLAGS if name in kwargs}
        return command(*args, metadata={k: v for k, v in metadata.items() if v is not None}, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*own, *flags])  # type: ignore[attr-defined]
    del wrapper.__wrapped__  # typer must read the new signature, not the wrapped one's
    return wrapper  # type: ignore[return-value]


@app.command()
@user_errors
@with_model_metadata
def models(
    describe: Annotated[
        Optional[str],
        typer.Option("--describe", help="Describe this model spec: metadata, layers, what each interpreter can do."),
    ] = None,
    weights: WeightsArg = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    metadata: Any = None,
) -> None:
    """List the built-in models with their metadata, or describe one model spec (--describe)."""
    if describe is not None:
        from .describe import describe_model

        options = _model_options(weights, metadata)
        facts = describe_model(_load(describe, options))
        if as_json:
            typer.echo(json.dumps(facts, indent=2))
            return
        for key, value in facts.items():
            if isinstance(value, dict):
                typer.echo(f"{key}:")
                for name, line in value.items():
                    typer.echo(f"  {name:<11} {line}")
            else:
                typer.echo(f"{key:<13} {value}")
        return
    from .models.checkpoint import load_checkpoint
    from .models.specs import BUILTIN_MODELS, builtin_weights_path

    rows = []
    for name in BUILTIN_MODELS:
        _, meta = load_checkpoint(builtin_weights_path(name))
        rows.append(
            {
                "name": name,
                **{
                    k: meta.get(k)
                    for k in (
                        "architecture",
                        "input_size",
                        "class_names",
                        "test_accuracy",
                        "parameters",
                        "train_seconds",
                    )
                },
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(
            f"{row['name']:<18} {row['architecture']:<9} {row['input_size']}×{row['input_size']}  "
            f"{len(row['class_names'])} classes  {row['parameters']:,} parameters  "
            f"test accuracy {row['test_accuracy']:.2%}"
        )


@app.command()
@user_errors
@with_model_metadata
def evaluate(
    model: ModelArg = "shapes-resnet",
    data: Annotated[
        str, typer.Option("--data", "-d", help="shapes:test|val|train, or a folder with one subfolder per class.")
    ] = "shapes:test",
    weights: WeightsArg = None,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate only the first N images.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 256,
    interpreter: Annotated[
        Optional[str],
        typer.Option("--interpreter", "-i", help="Also score this interpreter's maps against the object masks."),
    ] = None,
    option: OptionArg = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (field 'accuracy').")] = False,
    device: DeviceArg = "auto",
    metadata: Any = None,
) -> None:
    """Print a model's accuracy and per-class accuracy on a labelled dataset.

    With --interpreter, also the pointing game and object IoU of that interpreter's maps for the
    true class (the dataset needs object masks: shapes, or an exported folder).
    """
    from torch.utils.data import Subset

    from .data import open_dataset
    from .evaluation import evaluate as run_evaluation

    _positive("--batch-size", batch_size)
    _threads()
    classifier = _load(model, _model_options(weights, metadata, device=device))
    dataset = open_dataset(
        data,
        size=classifier.input_size or 224,
        class_names=classifier.class_names,
        channels=classifier.in_channels,
        outputs=classifier.num_classes,
    )
    if limit is not None:
        _positive("--limit", limit)
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    explainer = None
    if interpreter is not None:
        explainer = _interpreter(interpreter, classifier, option)
    elif option:
        raise UnderfireError("--option needs --interpreter")
    progress = not as_json
    result = run_evaluation(classifier, dataset, data_name=data, batch_size=batch_size, progress=progress)
    report = result.as_dict()
    if explainer is not None:
        from .evaluation import localisation

        source = dataset.dataset if isinstance(dataset, Subset) else dataset
        quality = localisation(explainer, source, limit=len(dataset), progress=progress)
        report.update(interpreter=interpreter, pointing_game=quality.pointing_game, object_iou=quality.object_iou)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(
        f"{result.model} on {result.data}: accuracy {result.accuracy:.2%} ({result.images} {_plural(result.images, 'image')})"
    )
    for name, accuracy in result.per_class.items():
        shown = "—" if accuracy is None else f"{accuracy:.2%}"
        typer.echo(f"  {name:<12} {shown:>8}  ({result.counts[name]} {_plural(result.counts[name], 'image')})")
    if explainer is not None:
        typer.echo(f"{interpreter}: pointing game {report['pointing_game']:.2%}, object IoU {report['object_iou']:.3f}")


@app.command()
@user_errors
def interpreters(
    options: Annotated[
        bool, typer.Option("--options", help="Also list each interpreter's options (for --option KEY=VALUE).")
    ] = False,
) -> None:
    """List the interpreters (built-in and plugins)."""
    from .interpreters import INTERPRETERS, describe_interpreter

    for name in INTERPRETERS:
        typer.echo(f"{name:<11} {describe_interpreter(name)}")
        if options:
            for spec in INTERPRETERS.get(name).option_specs().values():
                typer.echo(f"{'':<13}{spec.describe()}")


@app.command()
@user_errors
def attacks(
    options: Annotated[
        bool, typer.Option("--options", help="Also list each attack's settings (for underfire attack --set KEY=VALUE).")
    ] = False,
) -> None:
    """List the attacks (built-in and plugins)."""
    from .attacks import ATTACKS
    from .options import dataclass_options

    for name, cls in ATTACKS.items():
        kind = "per interpreter" if cls.uses_interpreter else "shared by all interpreters"
        typer.echo(f"{name:<11} {cls.description} [{kind}]")
        if options:
            for spec in dataclass_options(cls.config_type).values():
                typer.echo(f"{'':<13}{spec.describe()}")


@app.command()
@user_errors
@with_model_metadata
def explain(
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, ...).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for maps (.npy) and overlays (.png).")],
    model: ModelArg = "shapes-resnet",
    interpreter: InterpreterArg = "cam",
    option: OptionArg = None,
    weights: WeightsArg = None,
    target: Annotated[
        Optional[str], typer.Option("--class", help="Explain this class (name or id) instead of the prediction.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for stochastic interpreters (SmoothGrad, MASK).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 16,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON: per image the predicted class and the paths.")
    ] = False,
    device: DeviceArg = "auto",
    metadata: Any = None,
) -> None:
    """Explain predictions: one saliency map per image, saved as .npy (float32, h×w) and a jet overlay PNG."""
    import numpy as np
    import torch

    from .data import read_image
    from .options import check_seed
    from .store.files import check_output_folder
    from .visualize import overlay, save_png

    _positive("--batch-size", batch_size)
    check_seed("--seed", seed)
    check_output_folder(out)
    _threads()
    classifier = _load(model, _model_options(weights, metadata, seed, device))
    explainer = _interpreter(interpreter, classifier, option)
    size = classifier.input_size or 224
    pictures = torch.stack([read_image(path, size, classifier.in_channels) for path in images]).to(
        classifier.device
    )  # every file read before any work
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for start in range(0, len(images), batch_size):
        batch = pictures[start : start + batch_size]
        probabilities = classifier.predict(batch).softmax(1)
        predicted = probabilities.argmax(1)
        classes = predicted if target is None else classifier.check_classes(classifier.class_index(target), len(batch))
        maps = explainer(batch, classes, seed=seed + start)
        for offset, path in enumerate(images[start : start + batch_size]):
            index = start + offset
            stem = f"{index:03d}-{path.stem}"
            saliency = maps[offset, 0].cpu().numpy().astype(np.float32)
            map_path = out / f"{stem}.{interpreter}.npy"
            np.save(map_path, saliency)
            scale = max(1, 256 // size)
            overlay_path = save_png(overlay(batch[offset], maps[offset]), out / f"{stem}.{interpreter}.png", scale)
            label = int(predicted[offset])
            rows.append(
                {
                    "image": str(path),
                    "predicted_class": label,
                    "predicted_name": classifier.class_names[label] if classifier.class_names else str(label),
                    "confidence": round(float(probabilities[offset, label]), 5),
                    "explained_class": int(classes[offset]),
                    "map": str(map_path),
                    "overlay": str(overlay_path),
                    "map_shape": list(saliency.shape),
                }
            )
    if as_json:
        typer.echo(json.dumps({"model": classifier.name, "interpreter": interpreter, "images": rows}, indent=2))
        return
    for row in rows:
        typer.echo(f"{row['image']}: {row['predicted_name']} ({row['confidence']:.1%}) → {row['overlay']}")


@app.command()
@user_errors
@with_model_metadata
def attack(
    images: Annotated[Optional[list[Path]], typer.Argument(help="Image files to attack (or use --data).")] = None,
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Run folder: adversarial PNGs, maps, results.sqlite, report.json. A re-run resumes it."
        ),
    ] = Path("attack-out"),
    model: ModelArg = "shapes-resnet",
    interpreter: InterpreterArg = "cam",
    option: OptionArg = None,
    setting: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set",
            "-S",
            help="Attack setting KEY=VALUE, typed and validated (repeatable; underfire attacks --options lists them), "
            "e.g. adv_steps=300, lam=20,40 or surrogate_options='{\"steps\": 16}'.",
        ),
    ] = None,
    attack_name: Annotated[
        str, typer.Option("--attack", "-a", help="An attack name: adv2, pgd, ... (underfire attacks lists them).")
    ] = "adv2",
    target: Annotated[
        str, typer.Option(help="Target class (name or id) or 'random' (seeded, never the true class).")
    ] = "random",
    target_map: Annotated[
        str, typer.Option(help="benign, other, shape (circle), rectangle, or a .npy file.")
    ] = "benign",
    eps: Annotated[str, typer.Option(help="L∞ budget, e.g. 8/255.")] = "8/255",
    alpha: Annotated[Optional[str], typer.Option(help="Step size, e.g. 1/255 (default: the preset's).")] = None,
    preset_name: Annotated[
        str, typer.Option("--preset", help="quick (CPU demo) or paper (the paper's schedules).")
    ] = "quick",
    pgd_steps: Annotated[Optional[int], typer.Option(help="Override: stage-1 (PGD) steps.")] = None,
    adv_steps: Annotated[
        Optional[int], typer.Option(help="Override: stage-2 (joint objective) steps; PGD gets stage 1 + stage 2.")
    ] = None,
    restarts: Annotated[
        Optional[int],
        typer.Option(
            help="Run the attack this many times (the others from seeded random starts) and keep each image's best run."
        ),
    ] = None,
    relu: Annotated[
        Optional[str],
        typer.Option(help="Shorthand for --option relu=KIND (GRAD/SmoothGrad: h, sigmoid, softplus, none)."),
    ] = None,
    data: Annotated[
        Optional[str],
        typer.Option(help="Attack correctly classified images of a dataset (e.g. shapes:test) instead of files."),
    ] = None,
    limit: Annotated[int, typer.Option(help="With --data: how many images.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed for targets and stochastic parts.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images attacked together (at most: see --max-memory).")] = 50,
    weights: WeightsArg = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report.")] = False,
    device: DeviceArg = "auto",
    max_memory: MaxMemoryArg = None,
    metadata: Any = None,
) -> None:
    """Craft adversarial examples and measure how the interpretation moved.

    A one-attack experiment: the same code path, files and measures as `underfire run`.
    """
    from .attacks.config import parse_fraction
    from .options import parse_assignments
    from .runs import attack_experiment, run_attack

    overrides: dict[str, Any] = parse_assignments(setting or [], "--set")
    for key, value in (("alpha", alpha), ("pgd_steps", pgd_steps), ("adv_steps", adv_steps), ("restarts", restarts)):
        if value is not None:
            if key in overrides:
                raise InputError(f"--{key.replace('_', '-')} and --set {key}=... both set {key}; give one")
            overrides[key] = value
    options: dict[str, Any] = parse_assignments(option or [])
    if relu is not None:
        options["relu"] = relu
    if data:
        _positive("--limit", limit)
    _positive("--batch-size", batch_size)
    metadata = _model_options(weights, metadata)
    config = attack_experiment(
        model=model,
        model_options=metadata.as_table(),
        interpreter=interpreter,
        attack=attack_name,
        target=target,
        target_map=target_map,
        preset=preset_name,
        eps=parse_fraction(eps),
        seed=seed,
        batch_size=batch_size,
        files=list(images or []),
        data=data,
        limit=limit,
        overrides=overrides,
        options=options,
    )
    budget = _max_memory(max_memory)
    announce = _threads()
    report = _run_with_interrupt(
        lambda: run_attack(
            config,
            out,
            progress=not as_json,
            announce=None if as_json else announce,
            device=device,
            max_memory=budget,
        )
    )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    summary = report["summary"]
    typer.echo(
        f"{attack_name} vs {interpreter} on {summary['images']} {_plural(summary['images'], 'image')}: success {summary['success_rate']:.1%}, "
        f"p(target) {summary['mean_confidence']:.3f}, map L1 {summary['mean_l1']:.3f}, IoU {summary['mean_iou']:.3f} "
        f"→ {out / 'report.json'}"
    )


@app.command("run")
@user_errors
def run_command(
    config: Annotated[
        Path,
        typer.Argument(
            help="Experiment config (TOML): an experiment table and optional overrides tables (see README)."
        ),
    ],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Run folder (default: runs/NAME). A re-run resumes it.")
    ] = None,
    executor_name: Annotated[
        str,
        typer.Option(
            "--executor",
            help="auto (worker processes side by side when several cores are idle, else this process), serial, "
            "local (worker processes on this machine) or ray (Ray tasks; the ray extra).",
        ),
    ] = "auto",
    address: Annotated[
        Optional[str],
        typer.Option(
            "--address",
            help="With --executor ray: an existing cluster (auto or HOST:PORT); default: a local one for the run.",
        ),
    ] = None,
    workers: Annotated[
        Optional[int],
        typer.Option(
            "--workers",
            help="With --executor local: worker processes (default: the idle cores); with ray and no --address: "
            "CPUs of the local cluster (default: all).",
        ),
    ] = None,
    shard: Annotated[
        Optional[str],
        typer.Option(
            "--shard",
            help="Do part I of N of the units (I/N, e.g. 2/4) into its own folder; join the parts with underfire merge.",
        ),
    ] = None,
    device: DeviceArg = "auto",
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate",
            help="Only estimate the time and peak memory of what is left (pilot runs of the first batch at 2% and 5% of the steps and of MASK's solves); write nothing.",
        ),
    ] = False,
    max_memory: MaxMemoryArg = None,
) -> None:
    """Run an experiment: models × interpreters × attacks × target maps into RUN_DIR/results.sqlite.

    Resumable: a killed run, started again with the same command, does only what is missing.
    """
    from .runs import format_summary, load_experiment_config, run_experiment, summarise_run
    from .runs.plan import safe_name

    experiment = load_experiment_config(config)
    run_dir = out if out is not None else Path("runs") / safe_name(experiment.name)
    part = _parse_shard(shard) if shard is not None else None
    budget = _max_memory(max_memory)
    if estimate:
        _estimate(experiment, run_dir, device, part, budget)
        return
    announce, threads = _threads_and_announce()
    executor = _executor(executor_name, address, workers, experiment, threads, budget, announce)
    outcome = _run_with_interrupt(
        lambda: run_experiment(
            experiment,
            run_dir,
            progress=True,
            announce=announce,
            executor=executor,
            shard=part,
            device=device,
            max_memory=budget,
        )
    )
    _echo_outcome(outcome)
    if outcome.results:
        typer.echo(format_summary(summarise_run(run_dir)))
    typer.echo(
        f"HTML report: underfire report {run_dir}"
        if part is None
        else "a part: join the parts with underfire merge PART... --out RUN"
    )
    if outcome.failed:
        typer.echo(
            f"error: {outcome.failed} {_plural(outcome.failed, 'unit')} failed (recorded in {run_dir / 'results.sqlite'}, table failures); run the same command again to retry",
            err=True,
        )
        raise typer.Exit(1)


@app.command()
@user_errors
def merge(
    parts: Annotated[list[Path], typer.Argument(help="Run folders of the parts (underfire run --shard I/N).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The new run folder.")],
) -> None:
    """Join the parts of one sharded experiment into one run folder (checked: same config, inputs and version, no overlap)."""
    from .runs.merge import merge_runs

    outcome = merge_runs(parts, out)
    typer.echo(
        f"merged {outcome.parts} parts into {outcome.run_dir}: {outcome.results} results rows, {outcome.transfer} transfer rows"
        + (f", {outcome.failures} failed units" if outcome.failures else "")
    )
    typer.echo(f"HTML report: underfire report {outcome.run_dir}")


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder; a re-run in the same folder resumes.")] = Path(
        "underfire-demo"
    ),
    images: Annotated[
        Optional[int],
        typer.Option(help="Images per model (default 12)."),
    ] = None,
    preset_name: Annotated[
        str, typer.Option("--preset", help="quick (CPU demo) or paper (the paper's schedules).")
    ] = "quick",
    device: DeviceArg = "auto",
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate", help="Only estimate the time and peak memory (pilot runs of the first batch); write nothing."
        ),
    ] = False,
    max_memory: MaxMemoryArg = None,
) -> None:
    """Attack both built-in models with PGD and ADV² against grad, cam, rts and mask; write an HTML report."""
    from .runs import DEMO_IMAGES, demo_config, format_summary, run_experiment, summarise_run

    experiment = demo_config(DEMO_IMAGES if images is None else images, preset_name)
    budget = _max_memory(max_memory)
    if estimate:
        _estimate(experiment, out, device, None, budget)
        return
    announce, threads = _threads_and_announce()
    executor = _executor("auto", None, None, experiment, threads, budget, announce)
    outcome = _run_with_interrupt(
        lambda: run_experiment(
            experiment, out, progress=True, announce=announce, executor=executor, device=device, max_memory=budget
        )
    )
    _echo_outcome(outcome)
    from .report import write_report

    page = write_report(out, "html")
    typer.echo(format_summary(summarise_run(out), title=f"demo: {outcome.results} results ({preset_name} preset)"))
    typer.echo(f"report: {page}")


def _model_options(weights: str | None, metadata: dict[str, Any], seed: int = 0, device: str = "cpu") -> Any:
    """The model metadata flags as ``ModelOptions`` (validated; unset flags stay ``None``);
    ``seed`` seeds random weights (``torchvision:NAME@random``), ``device`` is ``--device``."""
    from .models.metadata import ModelOptions, class_names_option

    values = dict(metadata)
    if "classes" in values:
        values["class_names"] = class_names_option(values.pop("classes"))
    return ModelOptions(weights=weights, seed=seed, device=device, **values)


def _estimate(
    experiment: Any, run_dir: Path, device: str, shard: tuple[int, int] | None, max_memory: int | None
) -> None:
    from .runs.estimate import estimate_experiment

    _threads()
    result = estimate_experiment(
        experiment, run_dir, device=device, shard=shard, max_memory=max_memory, announce=typer.echo
    )
    typer.echo("nothing to do: the run is complete" if not result.units else result.line())


def _max_memory(text: str | None) -> int | None:
    from .runs.memory import parse_memory

    return None if text is None else parse_memory(text)


def _parse_shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit() or not 1 <= int(index) <= int(count):
        raise UnderfireError(f"--shard must be I/N with 1 <= I <= N (e.g. 2/4), got {text!r}")
    return int(index), int(count)


def _executor(
    name: str,
    address: str | None,
    workers: int | None,
    experiment: Any,
    threads: int = 1,
    budget: int | None = None,
    announce: Callable[[str], None] | None = None,
) -> Any:
    """The executor of ``--executor``: the Ray one with the config's ``[resources]``; ``auto``:
    worker processes side by side, one thread each, when several cores are idle now (``threads``,
    which the user did not fix), no memory budget is set and the run has several batches."""
    import os

    from .runs.local_executor import LocalExecutor

    if name not in ("auto", "serial", "local", "ray"):
        raise UnderfireError(f"--executor must be auto, serial, local or ray, got {name!r}")
    if address is not None and name != "ray":
        raise UnderfireError("--address goes with --executor ray")
    if name in ("auto", "serial"):
        if workers is not None:
            raise UnderfireError("--workers goes with --executor local or ray")
        chosen = any(os.environ.get(v, "").strip() for v in ("UNDERFIRE_THREADS", "OMP_NUM_THREADS"))
        if name == "serial" or threads < 2 or budget is not None or chosen:
            return None
        return LocalExecutor(threads, threads=1, announce=announce)
    if workers is not None:
        _positive("--workers", workers)
    if name == "local":
        return LocalExecutor(workers or max(1, threads), threads=1, announce=announce)
    if workers is not None:
        if address is not None:
            raise UnderfireError("--workers sizes a local cluster; an existing one (--address) has its own")
    from .runs.ray_executor import RayExecutor, import_ray

    import_ray()
    return RayExecutor(address=address, num_cpus=workers, resources=experiment.resources)


def _note(line: str) -> None:
    """A line for the user about the work (not its result): on stderr, so stdout stays parseable."""
    typer.echo(line, err=True)


def _threads() -> Callable[[str], None]:
    """Give torch the cores that are idle now (``threads.choose_threads``); returns the run's
    ``announce``: its planned-work line, with the thread count, as a note."""
    return _threads_and_announce()[0]


def _threads_and_announce() -> tuple[Callable[[str], None], int]:
    """``_threads``' announce, and the thread count it chose."""
    from .threads import choose_threads

    threads, why = choose_threads()
    said = []

    def announce(line: str) -> None:
        _note(line if said else f"{line}; {threads} torch {_plural(threads, 'thread')} in this process ({why})")
        said.append(line)

    return announce, threads


def _positive(flag: str, value: int) -> None:
    """A count flag (--batch-size, --limit) must be at least 1: zero would do nothing and say it did."""
    if value < 1:
        raise UnderfireError(f"{flag} must be a positive whole number, got {value}")


def _plural(count: int, noun: str) -> str:
    return noun if count == 1 else f"{noun}s"


def _load(spec: str, options: Any) -> Any:
    """The model of ``spec`` with the metadata flags, checked with one probe forward."""
    from .models import load_model

    return load_model(spec, options, hint=f"--input-size, --channels, --mean, --std, --classes {MODEL_HINT}")


def _interpreter(name: str, classifier: Any, pairs: list[str] | None) -> Any:
    """The interpreter ``name`` with the ``--option KEY=VALUE`` pairs (validated, typed)."""
    from .interpreters import build_interpreter
    from .options import parse_assignments

    return build_interpreter(name, classifier, **parse_assignments(pairs or []))


def _run_with_interrupt(work: Callable[[], Any]) -> Any:
    """Ctrl-C keeps every finished unit: say how to resume instead of printing a traceback."""
    try:
        return work()
    except KeyboardInterrupt:
        typer.echo("interrupted: finished units are saved; run the same command again to resume", err=True)
        raise typer.Exit(130) from None


def _echo_outcome(outcome: Any) -> None:
    if outcome.was_complete:
        typer.echo(f"nothing to do: {outcome.run_dir} is complete ({outcome.units} units)")
    else:
        typer.echo(
            f"ran {outcome.completed} of {outcome.units} units in {outcome.seconds:.0f} s"
            + (
                f" ({outcome.skipped} {'was' if outcome.skipped == 1 else 'were'} already done)"
                if outcome.skipped
                else ""
            )
            + f" → {outcome.run_dir / 'results.sqlite'}"
        )
    typer.echo(f"{outcome.results} results rows, {outcome.transfer} transfer rows")


@train_app.command("classifier")
@user_errors
def train_classifier_command(
    arch: Annotated[str, typer.Option(help="resnet or densenet.")] = "resnet",
    dataset: Annotated[str, typer.Option(help="Training data (the built-in 'shapes').")] = "shapes",
    epochs: Annotated[int, typer.Option(help="Passes over the training split.")] = 12,
    seed: Annotated[int, typer.Option(help="Seed for data, initialisation and batch order.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 128,
    train_size: Annotated[Optional[int], typer.Option(help="Use only the first N training images.")] = None,
    out: Annotated[Path, typer.Option(help="Checkpoint path (.safetensors; the .json goes beside it).")] = Path(
        "shapes-model.safetensors"
    ),
) -> None:
    """Train a built-in classifier architecture; writes safetensors weights + JSON metadata."""
    from .training import TrainConfig, train_classifier

    config = TrainConfig(
        arch=arch, dataset=dataset, epochs=epochs, seed=seed, batch_size=batch_size, train_size=train_size
    )
    from .store.files import check_output_file

    check_output_file(out, "--out")
    _threads()
    result = train_classifier(config, out)
    typer.echo(
        f"wrote {result.path}: test accuracy {result.test_accuracy:.2%}, "
        f"val accuracy {result.val_accuracy:.2%}, {result.seconds:.0f} s"
    )


@train_app.command("rts")
@user_errors
@with_model_metadata
def train_rts_command(
    model: ModelArg = "shapes-resnet",
    dataset: Annotated[
        str,
        typer.Option(
            "--data",
            "--dataset",
            "-d",
            help="Training data: the built-in 'shapes', or an image folder (one subfolder per class).",
        ),
    ] = "shapes",
    epochs: Annotated[int, typer.Option(help="Passes over the training images.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, batch order and fake selectors.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 32,
    train_size: Annotated[int, typer.Option(help="Training images (at most).")] = 8000,
    encoder: Annotated[
        Optional[Path], typer.Option(help="Encoder checkpoint (a resnet classifier); default: the shipped one.")
    ] = None,
    encoder_epochs: Annotated[
        int, typer.Option(help="With an image folder: pre-train the encoder on it for N epochs instead.")
    ] = 0,
    out: Annotated[
        Path,
        typer.Option(
            help="Checkpoint path (.safetensors; the .json goes beside it). A re-run resumes an unfinished one."
        ),
    ] = Path("rts.safetensors"),
    weights: WeightsArg = None,
    device: DeviceArg = "auto",
    metadata: Any = None,
) -> None:
    """Train a real-time saliency (RTS) network that explains MODEL; writes safetensors + JSON.

    Use it with --rts PATH (explain, attack), a model card's or [models.NAME] table's rts key.
    """
    from .devices import resolve_device
    from .store.files import check_output_file
    from .training.rts import RtsTrainConfig, train_rts

    check_output_file(out, "--out")
    options = _model_options(weights, metadata)
    config = RtsTrainConfig(
        model=model,
        dataset=dataset,
        epochs=epochs,
        seed=seed,
        batch_size=batch_size,
        train_size=train_size,
        encoder=None if encoder is None else str(encoder),
        encoder_epochs=encoder_epochs,
        model_options=options.as_table(),
    )
    _threads()
    result = train_rts(config, out, progress=True, device=resolve_device(device))
    scores = ", ".join(f"{key} {value:.3f}" for key, value in result.metrics.items())
    pointing = "" if "pointing_game" in result.metrics else " (no object masks in the data: no pointing game)"
    typer.echo(f"wrote {result.path}: {scores}{pointing}; {result.seconds:.0f} s; use it with --rts {result.path}")


@train_app.command("rts-adversarial")
@user_errors
@with_model_metadata
def train_rts_adversarial_command(
    model: ModelArg = "shapes-resnet",
    base: Annotated[
        Optional[Path],
        typer.Option(help="RTS checkpoint to start from; default: the model's own (--rts, else the shipped one)."),
    ] = None,
    rounds: Annotated[int, typer.Option(help="Rounds of (craft ADV² against the current network, fine-tune).")] = 8,
    attack_images: Annotated[int, typer.Option(help="Fresh training images attacked per round.")] = 128,
    steps_per_round: Annotated[int, typer.Option(help="Fine-tuning steps per round.")] = 100,
    adversarial_weight: Annotated[
        float, typer.Option(help="Weight of the empty-mask loss on adversarial images.")
    ] = 2.0,
    train_encoder: Annotated[
        bool,
        typer.Option(help="Fine-tune RTS's encoder too (CE toward the true class of clean and adversarial images)."),
    ] = True,
    seed: Annotated[int, typer.Option(help="Seed for image choice, targets, batches and the attack.")] = 0,
    train_size: Annotated[int, typer.Option(help="Training images drawn from (at most).")] = 4000,
    out: Annotated[
        Path,
        typer.Option(
            help="Checkpoint path (.safetensors; the .json goes beside it). A re-run resumes an unfinished one."
        ),
    ] = Path("rts-adversarial.safetensors"),
    weights: WeightsArg = None,
    device: DeviceArg = "auto",
    metadata: Any = None,
) -> None:
    """Fine-tune MODEL's RTS network against ADV² (a defence); writes safetensors + JSON.

    Every round crafts ADV² examples against the current network and teaches it the empty mask
    for their target class. Use the result with --rts PATH, or variant=adversarial for the
    shipped ones.
    """
    from .devices import resolve_device
    from .store.files import check_output_file
    from .training.rts_adversarial import AdversarialRtsConfig, train_adversarial_rts

    check_output_file(out, "--out")
    options = _model_options(weights, metadata)
    config = AdversarialRtsConfig(
        model=model,
        base=None if base is None else str(base),
        rounds=rounds,
        attack_images=attack_images,
        steps_per_round=steps_per_round,
        adversarial_weight=adversarial_weight,
        train_encoder=train_encoder,
        seed=seed,
        train_size=train_size,
        model_options=options.as_table(),
    )
    _threads()
    result = train_adversarial_rts(config, out, progress=True, device=resolve_device(device))
    before, after = result.before, result.after
    last = result.rounds[-1]
    typer.echo(
        f"wrote {result.path}: pointing game {before['pointing_game']:.3f} -> {after['pointing_game']:.3f}, "
        f"object IoU {before['iou_object_area']:.3f} -> {after['iou_object_area']:.3f}; last round's ADV2 "
        f"against it: success {last['attack_success']:.0%}, IoU {last['attack_iou']:.3f}; {result.seconds:.0f} s"
    )


@data_app.command("export")
@user_errors
def export_command(
    data: Annotated[str, typer.Argument(help="Dataset spec, e.g. shapes:test.")],
    out: Annotated[Path, typer.Argument(help="Output folder.")],
    limit: Annotated[Optional[int], typer.Option(help="Export only the first N images.")] = None,
    size: Annotated[int, typer.Option(help="Image side length.")] = 64,
    seed: Annotated[int, typer.Option(help="Dataset seed.")] = 0,
) -> None:
    """Write a dataset as PNGs in class subfolders (images/CLASS/*.png, masks/CLASS/*.png)."""
    from .data import export_dataset, open_dataset
    from .store.files import check_output_folder

    if limit is not None:
        _positive("--limit", limit)
    check_output_folder(out)
    dataset = open_dataset(data, size=size, seed=seed)
    path = export_dataset(dataset, out, limit=limit, progress=True)
    count = min(limit or len(dataset), len(dataset))
    typer.echo(f"wrote {count} {_plural(count, 'image')} to {path}")


@app.command()
@user_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (holds results.sqlite), e.g. from `underfire run`.")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="html (self-contained page), json or csv (the summary table).")
    ] = "html",
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Output file (default: RUN_DIR/report.FORMAT).")
    ] = None,
) -> None:
    """Report a run: summary table, IoU-vs-k curves, transfer matrix and image grids (works on partial runs)."""
    from .report import write_report
    from .store.files import check_output_file

    if out is not None:
        check_output_file(out, "--out")
    typer.echo(f"wrote {write_report(run_dir, fmt=fmt, out=out)}")


@app.command()
@user_errors
def detect(
    run_dir: Annotated[
        Path, typer.Argument(help="Run directory (holds results.sqlite) with benign and attacked images.")
    ],
    ensemble: Annotated[
        str,
        typer.Option("--ensemble", help="Interpreters that explain each image, comma-separated (different classes)."),
    ] = "grad,cam,rts,mask",
    fpr: Annotated[
        float,
        typer.Option("--fpr", help="False-positive rate the threshold is calibrated for, on the run's benign images."),
    ] = 0.05,
    score: Annotated[
        str,
        typer.Option(
            "--score",
            help="Disagreement score: iou (1 - mean pairwise IoU test), l1, rank (1 - Spearman) or soft_iou (iou with soft top-k sets).",
        ),
    ] = "iou",
    grid: Annotated[
        Optional[int], typer.Option("--grid", help="Side of the common grid (default: the coarsest member map).")
    ] = None,
    holdout: Annotated[
        float,
        typer.Option(
            "--holdout",
            help="Share of the benign images held out of the calibration: the rates are measured on them and on the attacks of them (0: in-sample).",
        ),
    ] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the calibration / held-out split.")] = 0,
    model: Annotated[
        Optional[list[str]], typer.Option("--model", help="Only this model of the run (repeatable; default: all).")
    ] = None,
    device: DeviceArg = "auto",
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="One JSON list: a row per model x attack x attacked interpreter (PGD: one row, interpreter any).",
        ),
    ] = False,
) -> None:
    """Ensemble-interpretation detector on a run: TPR at a calibrated FPR and ROC AUC per attack and attacked interpreter."""
    from .detection import DetectorConfig
    from .options import coerce_value
    from .runs.detect import detect_run

    if not 0 < fpr < 1:
        raise InputError(f"--fpr must be in (0, 1), got {fpr}")
    members = coerce_value("--ensemble", ensemble, tuple[str, ...])
    config = DetectorConfig(members=members, score=score, grid=grid)  # type: ignore[arg-type]
    # progress goes to stderr, so --json's stdout stays one JSON document; scoring a run takes minutes
    rows = detect_run(
        run_dir,
        config,
        fpr,
        device=device,
        progress=True,
        holdout=holdout,
        seed=seed,
        models=tuple(model) if model else None,
    )
    if as_json:
        typer.echo(json.dumps([row.as_dict() for row in rows], indent=2))
        return
    for model in dict.fromkeys(row.model for row in rows):
        spread = next(row.benign for row in rows if row.model == model)
        typer.echo(
            f"{model}: benign {score} scores of {spread['n']} images: mean {spread['mean']:.3f}, sd {spread['std']:.3f}, 95th percentile {spread['p95']:.3f}"
        )
        first = next(row for row in rows if row.model == model)
        if holdout:
            typer.echo(
                f"  threshold calibrated on {first.calibration} benign images, rates measured on the {first.evaluation} held out and their attacks"
            )
        for row in (r for r in rows if r.model == model):
            rates = (
                "no successful example"
                if row.tpr is None
                else f"TPR {row.tpr:.2f} at FPR {row.fpr:.2f} (threshold {row.threshold:.3f}), AUC {row.auc:.2f}"
            )
            typer.echo(f"  {row.attack} vs {row.interpreter} ({row.target_map}, {row.examples} examples): {rates}")


@app.command()
def version() -> None:
    """Print the underfire version."""
    from .versions import __version__

    typer.echo(__version__)


if __name__ == "__main__":  # pragma: no cover
    app()
