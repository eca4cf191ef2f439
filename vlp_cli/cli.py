"""The `vlp` command line: one short command per stage, no logic of its own.

Heavy imports (torch, transformers) happen inside the commands, so `vlp --help` is quick.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from vlp_cli import VlpError, __version__
from vlp_cli import tasks as registry
from vlp_cli.config import builtin_recipes
from vlp_cli.readers import READERS, image_sources, sources_help

logger = logging.getLogger("vlp_cli")
BUILTINS = ", ".join(builtin_recipes())
# Choices and help come from the task registry (tasks/): this file names no task.
FINETUNE = registry.names("finetune")
T0 = FINETUNE[0]
NAMED = image_sources()  # data sets a reader provides images for by name


def _task_list(names: list[str]) -> str:
    return "\n\n".join(f"* `{n}`: {registry.TASKS[n].help}" for n in names)
_debug = False  # set by the --debug global option, for the command that follows

app = typer.Typer(
    name="vlp",
    help="Vision-language pre-training (Oscar, UNITER): images -> features -> corpus -> "
         "pre-trained and fine-tuned checkpoints -> metrics and captions.\n\n"
         "Examples (the whole chain; `make demo` runs it on the embedded data):\n\n"
         "    vlp extract-features photos/ -o feats/\n\n"
         "    vlp build-corpus train=caps.jsonl test=caps_test.jsonl -f feats/ -o corpus/\n\n"
         "    vlp pretrain tiny -c corpus/ -f feats/ -o ckpt/\n\n"
         f"    vlp finetune {T0} -k ckpt/ -c corpus/ -f feats/ -o ckpt-{T0}/\n\n"
         f"    vlp evaluate {T0} -k ckpt-{T0}/ -c corpus/ -f feats/\n\n"
         "    vlp caption -k ckpt-cap/ --images photos/ -o captions.jsonl\n\n"
         f"Built-in recipes, by name or as recipes/NAME.yaml: {BUILTINS}.\n\n"
         "`vlp COMMAND --help` for each command's options and examples; `vlp --debug "
         "COMMAND ...` shows the full traceback of any error.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)

# Shared option aliases --------------------------------------------------------------------------
Recipe = Annotated[Optional[Path], typer.Option("--recipe", "-r", help="Recipe YAML, or a "
                   f"built-in recipe's name ({BUILTINS}). Without it: vlp's defaults "
                   "(extract-features, build-corpus) or the checkpoint's own recipe (finetune, "
                   "evaluate, caption); the run says which settings were not yours.")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a recipe key, "
                 "e.g. `--set pretrain.train.steps=100`; repeatable.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]
Features = Annotated[Path, typer.Option("--features", "-f", help="Feature store directory "
                     "(from `vlp extract-features`).")]
Corpus = Annotated[Path, typer.Option("--corpus", "-c", help="Corpus store directory (from "
                   "`vlp build-corpus`).")]
Checkpoint = Annotated[Path, typer.Option("--checkpoint", "-k", help="Checkpoint directory.")]
ImageBoxes = Annotated[Optional[Path], typer.Option("--boxes", help="Given boxes for the images, "
                      "when the checkpoint was trained on given boxes (else the embedded "
                      "detector).")]
JsonlOut = Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write JSONL here.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its "
                   "newest saved training state (an error when there is none).")]
AutoResume = Annotated[bool, typer.Option("--auto-resume", help="Continue the run in --out "
                       "when it has a saved state, start it otherwise (for job schedulers that "
                       "requeue a killed job with the same command).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
AllowIncomplete = Annotated[bool, typer.Option(help="Use a feature store whose extraction has "
                            "not finished (a warning says how many images are missing).")]


def _friendly(fn: Callable) -> Callable:
    """User errors (VlpError, and the OS, JSON and LMDB errors a user causes) become one red
    line and exit status 1 (also under CliRunner); bugs keep their traceback; --debug shows
    the traceback of everything."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        from vlp_cli.errors import user_message

        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if _debug:
                raise
            paths = [Path(v) for v in kwargs.values() if isinstance(v, (str, Path)) and v]
            message = user_message(exc, paths)
            if message is None:
                raise
            typer.secho(f"error: {message}", fg="red", err=True)
            raise typer.Exit(getattr(exc, "exit_code", 1)) from None

    return wrapper


def _setup(verbose: bool = False) -> None:
    from vlp_cli.console import setup_logging

    setup_logging(verbose)


def _recipe(path: Path | None, sets: list[str] | None, sections: list[str]) -> object:
    """The command's recipe; says once which of `sections` came from vlp's defaults."""
    from vlp_cli.config import load_stage_recipe

    return load_stage_recipe(path, sets or [], sections)


def _checkpoint_recipe(checkpoint: Path, recipe: Path | None, sets: list[str] | None) -> object:
    """The given recipe, else the checkpoint's own (said once)."""
    from vlp_cli.stages.common import checkpoint_recipe

    stored = Path(checkpoint) / "recipe.yaml"
    if recipe is None and Path(checkpoint).is_dir():
        logger.info("no --recipe: using %s", f"{stored}, the recipe the checkpoint was made "
                    "with" if stored.is_file() else f"vlp's defaults ({checkpoint} holds no "
                    "recipe.yaml)")
    return checkpoint_recipe(checkpoint, recipe, sets or [])


def _writable(path: Path | None, file: bool = False) -> None:
    from vlp_cli.outputs import check_writable

    if path is not None:
        check_writable(path, file=file)


def _output(path: Path) -> object:
    """Removes the output folder again if the stage fails while it is still empty."""
    from vlp_cli.outputs import output_dir

    return output_dir(path, create=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vlp {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version.")] = False,
          debug: Annotated[bool, typer.Option("--debug", envvar="VLP_DEBUG", help="Show the "
                           "full traceback of any error, a user's mistake included.")] = False,
          ) -> None:
    """vlp: vision-language pre-training from a laptop CPU to many GPUs."""
    global _debug
    _debug = debug


@app.command("extract-features", help=f"""Images -> region features, boxes and object tags (an LMDB feature store).

Boxes and tags come from the embedded YOLOv3-tiny (COCO) unless --boxes or another
detector is given; every box above a low threshold is kept and recipes choose at read
time. Keys are image paths relative to the folder. Rerunning into the same --out resumes;
under `accelerate launch` each process writes one shard.

Examples:

    vlp extract-features photos/ --out feats/ --draw drawn/

    vlp extract-features {NAMED[0]} --out feats/ --recipe recipes/tiny.yaml

    accelerate launch --num_processes 4 -m vlp_cli extract-features photos/ -o feats/
""")
@_friendly
def extract_features(
    images: Annotated[str, typer.Argument(help="Image folder (recursive: jpg, png, webp, bmp), "
                                               "or a data set vlp provides by name: "
                                               f"{', '.join(NAMED)}.")],
    out: Out,
    boxes: Annotated[Optional[Path], typer.Option(help="JSONL of given boxes per image: "
                     '{"image": key, "boxes": [[x1,y1,x2,y2],...], "labels": [...]}; optional '
                     '"scores": [...], and "classes": [...] with "probs": [[...],...] (a class '
                     "distribution per box, stored like a detector's).")] = None,
    detector_cfg: Annotated[Optional[Path], typer.Option(help="A Darknet-format detector "
                            "cfg (instead of the embedded YOLOv3-tiny).")] = None,
    detector_weights: Annotated[Optional[Path], typer.Option(help="Its .weights file.")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="Its class names, one per line.")]
    = None,
    draw: Annotated[Optional[Path], typer.Option(help="Also write each image with its boxes "
                    "and tags drawn into this folder.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N images.", min=1)] = None,
    strict: Annotated[bool, typer.Option(help="Exit non-zero if any image fails.")] = False,
    recipe: Recipe = None, sets: Sets = None, verbose: Verbose = False,
) -> None:
    _setup(verbose)
    from vlp_cli.stages import extract

    extra = list(sets or [])
    if detector_cfg or detector_weights or labels:
        extra += ["extract.detector=darknet", f"extract.detector_cfg={detector_cfg or ''}",
                  f"extract.detector_weights={detector_weights or ''}",
                  f"extract.detector_labels={labels or ''}"]
    _writable(out)
    _writable(draw)
    with _output(out):
        extract.run(images, out, _recipe(recipe, extra, ["extract"]), boxes=boxes, limit=limit,
                    strict=strict, draw=draw)


@app.command("build-corpus", help=f"""Data-set files + features -> a tokenised corpus (LMDB).

Each source is read by the reader of its format:

{chr(10).join(f"* {r.SOURCE_HELP}. {getattr(r, 'DETAILS', '')}" + chr(10) for r in READERS.values())}
Without a val split in the sources, `corpus.val_fraction` of the train images move to `val`.

Examples:

    vlp build-corpus {NAMED[0]} --features feats/ --out corpus/

    vlp build-corpus train=caps.jsonl test=caps_test.jsonl -f feats/ -o corpus/
""")
@_friendly
def build_corpus(
    sources: Annotated[list[str], typer.Argument(help=sources_help())],
    features: Features, out: Out,
    skip_missing: Annotated[bool, typer.Option(help="Skip examples whose image has no "
                            "features instead of failing.")] = False,
    allow_incomplete: AllowIncomplete = False,
    exclude: Annotated[Optional[list[str]], typer.Option(
        help="A source (same syntax) whose images must not be in this corpus, e.g. "
             "test=dataset_coco.json: every example naming one is dropped, the counts "
             "logged and recorded. Repeat for several.")] = None,
    recipe: Recipe = None, sets: Sets = None, verbose: Verbose = False,
) -> None:
    _setup(verbose)
    from vlp_cli.stages import corpus

    _writable(out)
    with _output(out):
        corpus.run(sources, features, out, _recipe(recipe, sets, ["corpus"]),
                   skip_missing=skip_missing, allow_incomplete=allow_incomplete,
                   exclude=exclude or [])


@app.command("import-features")
@_friendly
def import_features(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help="oscar | vinvl | uniter-npz | "
                                                              "uniter-lmdb")],
    src: Annotated[Path, typer.Argument(help="Oscar's features.tsv (or its folder), VinVL's "
                   "predictions.tsv, a folder of UNITER .npz files, or a UNITER image LMDB "
                   "(or the img_db folder holding one).")],
    out: Out,
    labels: Annotated[Optional[Path], typer.Option(help="Class names, one per line (e.g. "
                      "Visual Genome's objects_vocab.txt): the tag vocabulary. UNITER: names "
                      "the soft_labels columns (else numeric names).")] = None,
    tags: Annotated[Optional[Path], typer.Option(help="Oscar: the tags TSV (default: "
                    "predictions.tsv, label.tsv or predictions_gt.tsv beside features.tsv).")]
    = None,
    hw: Annotated[Optional[Path], typer.Option(help="Image sizes, rows `key <TAB> "
                  '[{"height": h, "width": w}]` (a VinVL hw.tsv). VinVL needs it; Oscar and '
                  "UNITER use it to store pixel boxes.")] = None,
    feature_dim: Annotated[Optional[int], typer.Option(help="Expected feature width "
                           "(default: the first image's).")] = None,
    verbose: Verbose = False,
) -> None:
    """Oscar / VinVL / UNITER region features -> a new feature store (keys keep their ids).

    The store records that vlp's extractor cannot reproduce these features from raw images.

    Examples:

        vlp import-features oscar datasets/coco_ir/ --out feats/

        vlp import-features uniter-lmdb img_db/coco_val2014/ --labels objects_vocab.txt -o feats/
    """
    _setup(verbose)
    from vlp_cli.stages import convert

    _writable(out)
    with _output(out):
        convert.import_features(fmt, src, out, labels=labels, tags=tags, hw=hw,
                                feature_dim=feature_dim)


@app.command("export-scenes")
@_friendly
def export_scenes(
    spec: Annotated[str, typer.Argument(help="`scenes` (3,000 + 600) or `scenes:N` (the first "
                    "N train scenes and N/5 test scenes).")] = "scenes",
    out: Out = Path("scenes-formats"),
    verbose: Verbose = False,
) -> None:
    """The embedded scene set written in the standard data sets' formats: COCO captions,
    VQA v2, GQA, NLVR2, SNLI-VE and RefCOCO files, the images, the simulated detector's
    boxes, each format's majority-class results file and sources.json (what to give
    build-corpus and evaluate for each). `make demo-tasks` uses it.

    Example:

        vlp export-scenes scenes:1000 --out scene-formats/
    """
    _setup(verbose)
    from vlp_cli.stages import convert

    _writable(out)
    convert.export_scenes(spec, out)


@app.command("export-features")
@_friendly
def export_features(
    store: Annotated[Path, typer.Argument(help="A feature store directory.")],
    out: Out,
    fmt: Annotated[str, typer.Option("--format", help="oscar-tsv: features.tsv, "
                   "features.lineidx, imageid2idx.json and predictions.tsv (tags).")]
    = "oscar-tsv",
    verbose: Verbose = False,
) -> None:
    """A feature store -> Oscar's files, for Oscar's own code (--img_feature_dim = dim + 6).

    Example:

        vlp export-features feats/ --format oscar-tsv --out coco_ir_feats/
    """
    _setup(verbose)
    from vlp_cli.stages import convert

    _writable(out)
    with _output(out):
        convert.export_features(store, fmt, out)


@app.command()
@_friendly
def pretrain(
    recipe: Annotated[Path, typer.Argument(help=f"Recipe YAML, or a built-in name ({BUILTINS})"
                                                 "; recipes/NAME.yaml finds the built-in too.")],
    out: Out,
    corpus: Annotated[list[Path] | None, typer.Option(
        "--corpus", "-c", help="Corpus directory (from `vlp build-corpus`); several: give "
        "--corpus and --features once per corpus, in the same order")] = None,
    features: Annotated[list[Path] | None, typer.Option(
        "--features", "-f", help="The feature store each --corpus was built on")] = None,
    resume: Resume = False,
    auto_resume: AutoResume = False, sets: Sets = None, verbose: Verbose = False,
) -> None:
    """Corpus + features -> a pre-trained checkpoint (Oscar's and UNITER's objectives, mixed).

    Runs under `accelerate launch` for several processes or GPUs. Built-in recipes: `tiny`
    (the demo, minutes on a CPU) and the papers' settings (`oscar-base`, `uniter-base`, ...).
    Several corpora (each with its own feature store) are mixed by `pretrain.corpora` ratios.

    Examples:

        vlp pretrain tiny -c corpus/ -f feats/ -o ckpt/

        vlp pretrain tiny -c coco/ -f coco-feats/ -c scenes/ -f scene-feats/ -o ckpt/

        accelerate launch -m vlp_cli pretrain recipes/oscar-base.yaml -c corpus/ -f feats/ -o ckpt/
    """
    _setup(verbose)
    from vlp_cli.stages import pretrain as stage

    r = _recipe(recipe, sets, ["data", "model", "pretrain"])
    _writable(out)
    with _output(out):
        stage.run(r, corpus, features, out, resume=resume, auto_resume=auto_resume)


@app.command(help=f"""Checkpoint + task corpus -> a fine-tuned checkpoint.

Tasks:

{_task_list(FINETUNE)}

Examples:

    vlp finetune {T0} -k ckpt/ -c corpus/ -f feats/ -o ckpt-{T0}/

    vlp finetune {FINETUNE[-1]} -k ckpt/ -c corpus/ -f feats/ -o ckpt-2/ --set {FINETUNE[-1]}.train.steps=2000
""")
@_friendly
def finetune(
    task: Annotated[str, typer.Argument(help=" | ".join(FINETUNE))],
    checkpoint: Checkpoint, corpus: Corpus, features: Features, out: Out,
    resume: Resume = False, auto_resume: AutoResume = False, recipe: Recipe = None,
    sets: Sets = None, verbose: Verbose = False,
) -> None:
    _setup(verbose)
    from vlp_cli.stages import finetune as stage

    r = _checkpoint_recipe(checkpoint, recipe, sets)
    _writable(out)
    with _output(out):
        stage.run(task, checkpoint, corpus, features, out, r, resume=resume,
                  auto_resume=auto_resume)


@app.command(help=f"""Checkpoint + corpus split -> metrics and predictions, in a folder of their own.

Tasks (a pre-training objective scores its held-out statistics):

{_task_list(list(registry.TASKS))}

Under `accelerate launch -m vlp_cli evaluate ...` the scoring is split over the processes.

Examples:

    vlp evaluate {T0} -k ckpt-{T0}/ -c corpus/ -f feats/

    vlp evaluate {FINETUNE[-1]} -k ckpt-2/ -c corpus/ -f feats/ --split val -o eval-val/
""")
@_friendly
def evaluate(
    task: Annotated[str, typer.Argument(help=" | ".join(registry.TASKS))],
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-k",
                          help="Checkpoint directory.")] = None,
    corpus: Annotated[Optional[Path], typer.Option("--corpus", "-c", help="Corpus store "
                      "directory (from build-corpus).")] = None,
    features: Annotated[Optional[Path], typer.Option("--features", "-f", help="Feature store "
                        "directory (from extract-features).")] = None,
    predictions: Annotated[Optional[Path], typer.Option(help="Or score this file of another "
                           "system's output (captions: COCO results JSON or JSONL {image, "
                           "caption}) against --references, without a checkpoint.")] = None,
    references: Annotated[Optional[Path], typer.Option(help="References for --predictions "
                          "(captions: a COCO captions_*.json or JSONL {image, caption}).")
                          ] = None,
    split: Annotated[str, typer.Option(help="Corpus split to score.")] = "test",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder for "
                   "metrics.json and predictions.jsonl (default: a new eval-CHECKPOINT-SPLIT "
                   "folder beside the checkpoint).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Score at most N examples / images.",
                                                 min=1)] = None,
    recipe: Recipe = None, sets: Sets = None, verbose: Verbose = False,
) -> None:
    """Checkpoint + corpus split -> metrics.json, predictions.jsonl; or score a predictions
    file against references.

    Examples:

        vlp evaluate vqa -k ckpt-vqa/ -c corpus/ -f feats/

        vlp evaluate captioning --predictions results.json --references captions_val2014.json
    """
    _setup(verbose)
    from vlp_cli.stages import evaluate as stage

    if predictions is not None or references is not None:
        if predictions is None or references is None:
            raise VlpError("--predictions and --references go together: give both")
        if checkpoint is not None or corpus is not None or features is not None:
            raise VlpError("--predictions scores a file without a model: drop --checkpoint, "
                           "--corpus and --features (or drop --predictions)")
        typer.echo(json.dumps(stage.score_files(task, predictions, references, out), indent=2))
        return
    missing = [o for o, v in (("--checkpoint", checkpoint), ("--corpus", corpus),
                              ("--features", features)) if v is None]
    if missing:
        raise VlpError(f"vlp evaluate {task}: missing {', '.join(missing)} (or score a file "
                       "with --predictions and --references)")
    result = stage.run(task, checkpoint, corpus, features,
                       _checkpoint_recipe(checkpoint, recipe, sets), split, out, limit)
    typer.echo(json.dumps(result, indent=2))


@app.command()
@_friendly
def caption(
    checkpoint: Checkpoint,
    out: Annotated[str, typer.Option("--out", "-o", help="Output JSONL file (or a folder to "
                   "hold captions.jsonl).")],
    features: Annotated[Optional[Path], typer.Option("--features", "-f", help="Caption the "
                        "images of this feature store.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Or caption an image folder "
                      "(features extracted as the checkpoint's were).")] = None,
    boxes: Annotated[Optional[Path], typer.Option(help="Given boxes for --images, when the "
                     "checkpoint was trained on given boxes.")] = None,
    corpus: Annotated[Optional[Path], typer.Option("--corpus", "-c", help="Take the images of "
                      "a corpus split, with their reference captions.")] = None,
    split: Annotated[str, typer.Option(help="Split of --corpus.")] = "test",
    limit: Annotated[Optional[int], typer.Option(help="At most N images.", min=1)] = None,
    beam: Annotated[Optional[int], typer.Option(help="Beam size (1: greedy); default the "
                    "recipe's beam_size.", min=1)] = None,
    constrain_tags: Annotated[bool, typer.Option("--constrain-tags", help="Constrained beam "
                              "search: each caption holds at least 2 of its image's first 3 "
                              "tags (NoCaps' CBS, as Oscar ran it).")] = False,
    draw: Annotated[Optional[Path], typer.Option(help="Write each image (--images) with its "
                    "boxes, tags and caption drawn into this folder.")] = None,
    allow_incomplete: AllowIncomplete = False,
    recipe: Recipe = None, sets: Sets = None, verbose: Verbose = False,
) -> None:
    """Captioning checkpoint + images or features -> captions (JSONL).

    Examples:

        vlp caption -k ckpt-cap/ --images photos/ -o captions.jsonl

        vlp caption -k ckpt-cap/ -f feats/ -c corpus/ --split test --limit 8 -o caps.jsonl

        vlp caption -k ckpt-cap/ --images photos/ -o results/ --beam 5   # results/captions.jsonl
    """
    _setup(verbose)
    from vlp_cli.stages import caption as stage

    stage.run(checkpoint, out, _checkpoint_recipe(checkpoint, recipe, sets),
              features=features, images=images, boxes=boxes, corpus=corpus, split=split,
              limit=limit, allow_incomplete=allow_incomplete, beam=beam,
              constrain_tags=constrain_tags, draw=draw)


@app.command()
@_friendly
def answer(
    images: Annotated[Path, typer.Argument(help="An image file or a folder of images.")],
    question: Annotated[str, typer.Argument(help="The question.")],
    checkpoint: Checkpoint,
    boxes: ImageBoxes = None,
    top: Annotated[int, typer.Option(help="Answers per image.", min=1)] = 5,
    draw: Annotated[Optional[Path], typer.Option(help="Write each image with its boxes, tags "
                    "and best answer drawn into this folder.")] = None,
    out: JsonlOut = None,
    recipe: Recipe = None, sets: Sets = None, verbose: Verbose = False,
) -> None:
    """VQA checkpoint + image(s) + a question -> the top answers with their scores.

    Examples:

        vlp answer photo.jpg "what color is the shape?" -k ckpt-vqa/

        vlp answer photos/ "is there a dog?" -k ckpt-vqa/ --top 3 -o answers.jsonl
    """
    _setup(verbose)
    from vlp_cli.infer import Predictor

    _writable(out, file=True)
    result = Predictor(checkpoint, boxes, _checkpoint_recipe(checkpoint, recipe, sets)
                       ).answer(images, question, top, draw=draw)
    rows = [{"image": k, "question": question,
             "answers": [{"answer": a, "score": round(sc, 4)} for a, sc in v]}
            for k, v in result.items()]
    _emit(rows, out)


@app.command()
@_friendly
def score(
    images: Annotated[Path, typer.Argument(help="An image file or a folder of images.")],
    texts: Annotated[list[str], typer.Argument(help="One or more texts to match.")],
    checkpoint: Checkpoint,
    boxes: ImageBoxes = None,
    draw: Annotated[Optional[Path], typer.Option(help="Write each image with its boxes, tags "
                    "and best-matching text drawn into this folder.")] = None,
    out: JsonlOut = None,
    recipe: Recipe = None, sets: Sets = None, verbose: Verbose = False,
) -> None:
    """Retrieval checkpoint + image(s) + texts -> match scores, texts ranked per image.

    Examples:

        vlp score photo.jpg "a red circle" "a blue square" -k ckpt-retrieval/
    """
    _setup(verbose)
    from vlp_cli.infer import Predictor

    _writable(out, file=True)
    result = Predictor(checkpoint, boxes, _checkpoint_recipe(checkpoint, recipe, sets)
                       ).score(images, list(texts), draw=draw)
    rows = [{"image": k, "scores": [{"text": t, "score": round(sc, 4)} for sc, t in
                                    sorted(zip(v, texts), key=lambda x: -x[0])]}
            for k, v in result.items()]
    _emit(rows, out)


def _emit(rows: list[dict], out: Path | None) -> None:
    """One JSON line per row on stdout, and into `out` when given."""
    lines = [json.dumps(r) for r in rows]
    for line in lines:
        typer.echo(line)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(x + "\n" for x in lines), encoding="utf-8")


@app.command()
@_friendly
def validate(
    recipe: Annotated[Path, typer.Argument(help=f"Recipe YAML, or a built-in name ({BUILTINS})."
                                                 )], sets: Sets = None,
) -> None:
    """Check a recipe (every key, type and range) without running anything; print it resolved.

    Every stage runs the same checks before it starts. Built-in recipes (by name, or as
    recipes/NAME.yaml from anywhere): `tiny`, the demo on the embedded data, minutes
    on a CPU; `oscar-base`, Oscar-B pre-training at the paper's scale, for many GPUs.

    Examples:

        vlp validate recipes/tiny.yaml --set pretrain.train.lr=1e-4

        vlp validate oscar-base
    """
    import yaml

    from vlp_cli.config import load_recipe, recipe_to_dict

    r = load_recipe(recipe, sets or [])
    registry.check_mix(r.pretrain.tasks, str(recipe))
    typer.echo(yaml.safe_dump(recipe_to_dict(r), sort_keys=False).rstrip())
    typer.echo(f"# {recipe}: valid", err=True)


@app.command()
@_friendly
def inspect(
    path: Annotated[Path, typer.Argument(help="A feature store, corpus, or checkpoint directory "
                                              "(or a metrics JSON).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Describe any store or checkpoint: schema, counts, dims, provenance.

    Examples:

        vlp inspect feats/

        vlp inspect ckpt/ --json
    """
    from vlp_cli.stages import inspect as stage

    info = stage.describe(path)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
    else:
        stage.show(info)


@app.command()
@_friendly
def verify(
    path: Annotated[Path, typer.Argument(help="A feature store (or folder of shards), corpus, "
                                              "checkpoint, or training state "
                                              "(CKPT/state/step-N) directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Read every record and check its checksum; exit 1 if anything is damaged.

    A checkpoint's files are checked against its manifest, its weights for NaN/inf, and its
    saved training states against theirs.

    Examples:

        vlp verify feats/

        vlp verify corpus/ --json

        vlp verify ckpt/
    """
    from vlp_cli.stages import verify as stage

    ok, text = stage.run(path, as_json)
    typer.echo(text)
    if not ok:
        raise typer.Exit(1)


@app.command()
@_friendly
def report(
    run_dir: Annotated[Path, typer.Argument(help="A folder of stage outputs (as `make demo` "
                                                 "writes).")],
) -> None:
    """Summarise a run folder: metrics of every evaluation and sample captions, as a table.

    Example:

        vlp report .demo/
    """
    from vlp_cli.stages import report as stage

    stage.show(run_dir)


@app.command()
@_friendly
def ablate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML with an `ablate` section, or a "
                                                 "built-in name (ablate-scenes)")],
    corpus: Corpus, features: Features, out: Out,
    seeds: Annotated[Optional[int], typer.Option(help="Seeds per variant (default: the "
                                                       "recipe's ablate.seeds).")] = None,
    variant: Annotated[Optional[list[str]], typer.Option(
        "--variant", help="Only these variants (repeatable); default all.")] = None,
    table_only: Annotated[bool, typer.Option(
        "--table-only", help="Tabulate the finished runs; run nothing.")] = False,
    sets: Sets = None, verbose: Verbose = False,
) -> None:
    """The papers' ablations at our scale: one factor per variant, several seeds, one table.

    Each (variant, seed) pre-trains, fine-tunes every `ablate.tasks` task with the same budget
    and evaluates it on the test split; finished runs are kept, so an interrupted ablation
    continues where it stopped. A claim counts as reproduced only where the mean gap exceeds
    twice the pooled standard deviation.

    Example:

        vlp ablate ablate-scenes -c scenes-corpus/ -f scenes-features/ -o ablation/
    """
    _setup(verbose)
    from vlp_cli import ablation
    from vlp_cli.config import resolve_recipe_path
    from vlp_cli.stages import report as stage

    r = _recipe(recipe, sets, ["ablate", "pretrain"])
    _writable(out)
    summary = ablation.run(r, resolve_recipe_path(recipe), corpus, features, out, seeds=seeds,
                           variants=variant, sets=sets, run_missing=not table_only)
    stage.show_ablation(summary, r)


@app.command()
@_friendly
def bench(
    name: Annotated[str, typer.Argument(help="pipeline | extract | store-read | extract-memory "
                                              "| padding | collate | train-step | ipot | decode "
                                              "| retrieval-eval | all")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write results here.")]
    = None,
    reps: Annotated[int, typer.Option(help="Measured repetitions (after one warm-up).")] = 5,
    verbose: Verbose = False,
) -> None:
    """Speed as ratios against a baseline interleaved in the same run (median of reps).

    Example:

        vlp bench pipeline --json bench.json
    """
    _setup(verbose)
    from vlp_cli.stages import bench as stage

    _writable(json_out, file=True)
    result = stage.run(name, reps=reps)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2))


def main() -> None:
    """Console entry point: user errors print one line, not a traceback."""
    try:
        app()
    except VlpError as exc:
        if _debug:
            raise
        from vlp_cli.errors import worker_message

        typer.secho(f"error: {worker_message(str(exc))}", fg="red", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg="red", err=True)
        sys.exit(130)
