"""The ``erasepro`` command line: thin commands, errors translated once.

Exit codes: 0 ok, 1 a check ran and failed, 2 bad input (the message names the
problem and the fix). Data goes to stdout, diagnostics and progress to stderr: a
command whose result is a folder or a commit prints just that (a summary goes to
stderr), the others a short text; with ``--json`` every command prints one JSON
object instead. Heavy libraries are imported only by the command that needs them.

Why one module of this length: one small function per command plus the parser; each command
is a few lines over the library, and keeping them together shows the whole command surface at once.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import EraseProError


class _StageBar:
    """A progress bar on stderr (hidden when stderr is not a terminal) that a computation drives.

    It is called with a stage's name as the stage finishes; ``start(step, total)`` names the step
    that begins (``loading base weights``, then ``solving`` with its number of stages), as
    :class:`erasepro_hub.computation.Progress` describes.
    """

    #: A step without a count (loading the base model) shows its name only.
    UNCOUNTED = "{desc}"

    def __init__(self, verb: str, total: int | None = None, unit: str = "stage"):
        from tqdm.auto import tqdm

        self.verb = verb
        self.bar = tqdm(
            desc=verb, total=total, unit=unit, file=sys.stderr, leave=False, disable=None,
            bar_format=None if total is not None else self.UNCOUNTED,
        )

    def start(self, step: str, total: int | None = None) -> None:
        self.bar.reset()
        self.bar.total = total
        self.bar.bar_format = None if total is not None else self.UNCOUNTED
        self.bar.set_description_str(f"{self.verb}: {step}")

    def __call__(self, stage: str) -> None:
        self.bar.update(1)

    def __enter__(self) -> _StageBar:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _print_json(data: dict) -> None:
    """The one JSON object a command prints on stdout under ``--json``."""
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _scalar_metrics(metrics: dict | None) -> dict:
    return {k: v for k, v in (metrics or {}).items() if not isinstance(v, dict)}


def _erasure_result(path: Path) -> dict:
    """What ``erase``, ``regenerate`` and ``combine`` report about the folder they wrote."""
    from .layout import MANIFEST_FILE
    from .manifest import load_manifest

    manifest = load_manifest(path / MANIFEST_FILE)
    sites = manifest.outputs.sites if manifest.outputs else []
    return {
        "folder": str(path),
        "name": manifest.name,
        "method": manifest.method,
        "base_model": manifest.base_model.id,
        "revision": manifest.base_model.revision,
        "concepts": [{"target": c.target, "anchor": c.anchor} for c in manifest.concepts],
        "sites": sum(1 for s in sites if s.update_rank),
        "total_rank": sum(s.update_rank for s in sites),
        "metrics": _scalar_metrics(manifest.metrics),
    }


#: The metrics a human summary shows, with their formats.
_SUMMARY_METRICS = (
    ("anchor_similarity", ".4f"),
    ("anchor_similarity_no_edit", ".4f"),
    ("preserve_similarity", ".4f"),
    ("preserve_similarity_min", ".4f"),
    ("residual_train", ".3e"),
    ("residual_heldout", ".3e"),
    ("preserve_drift", ".3e"),
    ("pooled_residual_train", ".3e"),
)


def _report_folder(path: Path, as_json: bool) -> None:
    """The written folder: its path on stdout and a summary on stderr, or one JSON object."""
    result = _erasure_result(path)
    if as_json:
        _print_json(result)
        return
    print(f"wrote {path} ({result['method']}, {result['sites']} sites, total rank {result['total_rank']})", file=sys.stderr)
    for key, fmt in _SUMMARY_METRICS:
        if isinstance(result["metrics"].get(key), (int, float)):
            print(f"  {key:26s} {result['metrics'][key]:{fmt}}", file=sys.stderr)
    print(path)  # the data a script reads: OUT=$(erasepro erase ...)


def cmd_erase(args: argparse.Namespace) -> int:
    with _StageBar("erase") as bar:  # shown before the heavy imports
        from .erase import erase

        out = erase(
            args.manifest, args.out, overwrite=args.overwrite, device=args.device, progress=bar,
            command=args.command_line,
        )
    _report_folder(out, args.json)
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    with _StageBar("combine") as bar:
        from .combine import combine

        out = combine(
            args.sources, args.out, name=args.name, overwrite=args.overwrite, device=args.device, progress=bar,
            command=args.command_line,
        )
    _report_folder(out, args.json)
    return 0


def cmd_regenerate(args: argparse.Namespace) -> int:
    with _StageBar("verify" if args.verify else "regenerate") as bar:
        from .verification import regenerate, verify

        if not args.verify:
            out = regenerate(
                args.folder, out=args.out, overwrite=args.overwrite, device=args.device, progress=bar,
                command=args.command_line,
            )
        else:
            result = verify(args.folder, device=args.device, progress=bar)
    if not args.verify:
        _report_folder(out, args.json)
        return 0
    if args.json:
        _print_json({
            "folder": str(result.folder),
            "ok": result.ok,
            "max_abs_diff": result.max_abs_diff,
            "atol": result.atol,
            "problems": result.problems,
        })
    if result.ok:
        if not args.json:
            print(f"verified: max |ΔW_stored − ΔW_regenerated| = {result.max_abs_diff:.3e} ≤ {result.atol:.3e}")
        return 0
    for problem in result.problems:
        print(f"verification failed: {problem}", file=sys.stderr)
    if result.max_abs_diff > result.atol:
        worst = max(result.per_site, key=result.per_site.get)
        print(
            f"verification failed: max |ΔW_stored − ΔW_regenerated| = {result.max_abs_diff:.3e} exceeds the "
            f"tolerance {result.atol:.3e} for the adapter's dtype (worst site {worst})",
            file=sys.stderr,
        )
    return 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from .adapters.folder import check_files, open_folder
    from .errors import AdapterFormatError, VerificationError
    from .manifest import load_manifest
    from .naming import is_denoiser_key

    folder = Path(args.folder)
    manifest = load_manifest(folder)  # a manifest file, or the folder holding one
    integrity, problem, adapter = "ok", None, None
    try:
        if folder.is_dir():
            check_files(folder, manifest)
            adapter = open_folder(folder).adapter
    except (VerificationError, AdapterFormatError) as exc:  # a damaged adapter is a failed integrity check too
        integrity, problem = "FAILED", str(exc)
    # the factors' bytes, and those of the same sites' dense m × d updates in the adapter's dtype
    adapter_bytes = adapter.stored_bytes if adapter is not None else None
    dense_bytes = adapter.dense_bytes if adapter is not None else None
    outputs = manifest.outputs
    sites = outputs.sites if outputs else []
    summary = {
        "name": manifest.name,
        "base_model": manifest.base_model.id,
        "revision": manifest.base_model.revision,
        "method": manifest.method,
        "concepts": [{"target": c.target, "anchor": c.anchor} for c in manifest.concepts],
        "token_policy": manifest.solver.token_policy,
        "text_encoder": manifest.text_encoder.model_dump(),
        "sites": sum(1 for s in sites if s.update_rank),
        "text_encoder_sites": sum(1 for s in sites if s.update_rank and not is_denoiser_key(s.name)),
        "total_rank": sum(s.update_rank for s in sites),
        "max_site_residual": max((s.residual for s in sites), default=None),
        "adapter_bytes": adapter_bytes,
        "dense_bytes": dense_bytes,
        "adapter_over_dense": adapter_bytes / dense_bytes if dense_bytes else None,
        "files": dict(outputs.files) if outputs else {},
        "metrics": {k: v for k, v in (manifest.metrics or {}).items() if not isinstance(v, dict)},
        "integrity": integrity,
    }
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print(f"erasure      {summary['name'] or folder.name}")
        print(f"base model   {summary['base_model']}" + (f"@{summary['revision']}" if summary["revision"] else ""))
        te = manifest.text_encoder
        print(
            f"method       {manifest.method} (token policy {manifest.solver.token_policy}; text encoder "
            f"{te.site} from layer {te.first_layer}, depth {te.depth if te.depth is not None else 'all'}, "
            f"target mode {te.target_mode})"
        )
        for c in manifest.concepts:
            print(f"concept      {c.target!r} → {c.anchor!r}")
        print(f"sites        {summary['sites']} ({summary['text_encoder_sites']} text-encoder), total rank {summary['total_rank']}")
        if dense_bytes:
            print(
                f"adapter      {adapter_bytes / 1e6:.3g} MB = {100 * summary['adapter_over_dense']:.1f} % of the dense "
                f"update ({dense_bytes / 1e6:.3g} MB)"
            )
        for name, sha in summary["files"].items():
            print(f"file         {name}  sha256 {sha[:16]}…")
        for key, value in summary["metrics"].items():
            if isinstance(value, float):
                print(f"metric       {key:24s} {value:.4g}")
        print(f"integrity    {integrity}")
    if problem:
        print(f"integrity check failed: {problem}", file=sys.stderr)
        return 1
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .api import push

    result = push(
        args.folder, args.repo_id, private=args.private, branch=args.branch, tag=args.tag, token=args.token,
        message=args.commit_message, create_pr=args.create_pr,
    )
    if args.json:
        _print_json({"folder": str(args.folder), **asdict(result)})
        return 0
    if result.pr_revision:
        print(f"opened a pull request on {result.repo_id} against {result.branch}: {result.pr_revision}", file=sys.stderr)
        print(f"  {result.pr_url}", file=sys.stderr)
        print(f"  review with: erasepro pull {result.repo_id}@{result.pr_revision}", file=sys.stderr)
    elif args.create_pr:
        print(f"{args.folder} is unchanged from {result.repo_id} ({result.branch}): no pull request opened", file=sys.stderr)
    else:
        state = "new commit" if result.new_commit else "unchanged, no new commit"
        where = result.branch + (f", tag {result.tag}" if result.tag else "")
        print(f"pushed {args.folder} to {result.repo_id} ({where}): {state}", file=sys.stderr)
    print(f"  load with revision={result.commit!r}", file=sys.stderr)
    print(result.commit)  # the data a script reads: SHA=$(erasepro push ...)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .hub.pull import pull

    result = pull(args.ref, args.out, overwrite=args.overwrite, token=args.token)
    if args.json:
        _print_json({"repo_id": result.repo_id, "revision": result.revision, "commit": result.commit,
                     "folder": str(result.folder), "verified": True})
        return 0
    print(f"pulled {result.repo_id}@{result.revision} = commit {result.commit} into {result.folder} (verified)", file=sys.stderr)
    print(result.folder)
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from .adapters.folder import open_folder
    from .cards import write_card

    opened = open_folder(args.folder)
    names = write_card(opened.path, opened.manifest, repo_id=args.repo_id, revision=args.revision)
    if args.json:
        _print_json({"folder": str(opened.path), "files": [str(opened.path / name) for name in names]})
        return 0
    for name in names:
        print(opened.path / name)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .metrics.images import ImageOptions
    from .evaluation import evaluate_folder

    options = ImageOptions(
        clip_model=args.clip_model, steps=args.steps, guidance=args.guidance, height=args.size, width=args.size,
        images_per_prompt=args.images_per_prompt, seed=args.seed, max_prompts=args.max_prompts, detector=args.detector,
    )
    metrics = evaluate_folder(args.folder, prompts=args.prompts, images=args.images, options=options, device=args.device)
    if not metrics:  # a non-main process of a distributed run
        return 0
    summary = _scalar_metrics(metrics)
    for key in ("baseline_uce", "images"):
        if key in metrics:
            summary[key] = _scalar_metrics(metrics[key])
    if args.json:
        _print_json(summary)
        return 0
    print(f"updated {args.folder}: metrics.json, erasepro.yaml and the card", file=sys.stderr)
    baseline = summary.get("baseline_uce", {})
    print(
        f"evaluated {args.folder} ({summary.get('method')}; {summary.get('n_heldout_prompts')} held-out and "
        f"{summary.get('n_preserve_prompts')} preserve prompts)"
    )
    print(f"  {'metric':26s} {'erasure':>10s}" + (f" {'UCE baseline':>12s}" if baseline else ""))
    for key, fmt in _SUMMARY_METRICS:
        if isinstance(summary.get(key), (int, float)):
            line = f"  {key:26s} {summary[key]:>10{fmt}}"
            if isinstance(baseline.get(key), (int, float)):
                line += f" {baseline[key]:>12{fmt}}"
            print(line)
    for key, value in summary.get("images", {}).items():
        if isinstance(value, float):
            print(f"  {'images.' + key:26s} {value:>10.4g}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .evaluation import DEFAULT_VARIANTS, compare, markdown_table, parse_variant, write_comparison

    variants = [parse_variant(m) for m in (args.methods.split(",") if args.methods else [])]
    variants += [parse_variant(v) for v in args.variant or []]
    if not variants:
        variants = [parse_variant(m) for m in DEFAULT_VARIANTS]
    with _StageBar("compare", total=len(args.manifests) * len(variants), unit="variant") as bar:
        rows = compare(args.manifests, variants, prompts=args.prompts, device=args.device, progress=bar)
    if args.out:
        for path in write_comparison(rows, args.out, command=args.command_line):
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        _print_json({"rows": rows})
    else:
        print(markdown_table(rows))
    return 0


def _json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="erasepro",
        description="Closed-form concept erasure for Stable Diffusion, as verifiable, regenerable adapters.",
    )
    parser.add_argument("--version", action="version", version=f"erasepro_hub {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="more diagnostics on stderr (Hub requests too)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("erase", help="solve a manifest and write the erasure folder")
    p.add_argument("manifest", help="the manifest (.yaml)")
    p.add_argument("--out", help="output folder (default: erasures/<name>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--device", default="cpu", help="torch device for the text encoders (default: cpu)")
    _json_option(p)
    p.set_defaults(func=cmd_erase)

    p = sub.add_parser("combine", help="solve several manifests or erasures as one erasure folder")
    p.add_argument("sources", nargs="+", metavar="MANIFEST_OR_DIR", help="manifests (.yaml) or erasure folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", help="the combined erasure's name (default: from the sources)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--device", default="cpu", help="torch device for the text encoders (default: cpu)")
    _json_option(p)
    p.set_defaults(func=cmd_combine)

    p = sub.add_parser("regenerate", help="recompute an erasure from DIR/erasepro.yaml")
    p.add_argument("folder", help="an erasure folder (or its erasepro.yaml), or a Hub reference user/name[@rev]")
    p.add_argument("--verify", action="store_true", help="compare with the stored adapter: exit 0 if within tolerance, else 1")
    p.add_argument("--out", help="where to write the regenerated folder (without --verify; default: DIR-regenerated)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default="cpu")
    _json_option(p)
    p.set_defaults(func=cmd_regenerate)

    p = sub.add_parser("push", help="publish an erasure folder to the Hub in one commit")
    p.add_argument("folder")
    p.add_argument("repo_id", help="user/name or org/name")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--branch", help="commit to this branch (created if missing; default main); with --create-pr, "
                                    "the existing branch the pull request targets")
    p.add_argument("--tag", help="tag the commit (an existing tag is never moved)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--commit-message", help="the commit's summary line (default: erasepro: NAME (METHOD))")
    p.add_argument("--token", help="a Hub token with write access (default: HF_TOKEN or `hf auth login`'s); never printed")
    _json_option(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("pull", help="download an erasure by revision, verified")
    p.add_argument("ref", metavar="REPO_ID[@REV]", help="user/name, optionally @branch, @tag, @commit or @refs/pr/N")
    p.add_argument("--out", help="output folder (default: the repository name)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--token", help="a Hub token for a private repository (default: HF_TOKEN or `hf auth login`'s)")
    _json_option(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("card", help="(re)render the model card and plot of an erasure folder")
    p.add_argument("folder")
    p.add_argument("--repo-id", help="the repository the card should point to")
    p.add_argument("--revision", help="the revision the card's snippet loads (default main)")
    _json_option(p)
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("eval", help="measure an erasure (feature metrics, UCE baseline, optional images)")
    p.add_argument("folder")
    p.add_argument("--prompts", help="extra prompts: a .json/.jsonl/.csv/.parquet file or a Hub dataset org/name[@rev][:split]")
    p.add_argument("--images", action="store_true", help="also generate images and compute image metrics (GPU users)")
    p.add_argument("--clip-model", help="CLIP model id or folder for image metrics")
    p.add_argument("--detector", help="package.module:function scoring images (e.g. a nudity classifier)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--size", type=int, help="image height and width (default: the pipeline's)")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--max-prompts", type=int, help="use at most this many prompts per set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    _json_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="run methods and setting variants on the same prompts, side by side")
    p.add_argument("manifests", nargs="+", help="one or more manifests (one table section each)")
    p.add_argument(
        "--methods",
        help="comma-separated methods, e.g. uce,erasepro-kv,erasepro; uce-erasepro-tokens is UCE on ErasePro's tokens "
        "(default: uce,uce-erasepro-tokens,erasepro-kv,erasepro)",
    )
    p.add_argument("--variant", action="append", help="a named variant: NAME:key=value[,key=value] (dotted manifest keys)")
    p.add_argument("--prompts", help="extra held-out/preserve prompts, as for eval")
    p.add_argument("--out", help="write compare.md and compare.json into this folder")
    p.add_argument("--device", default="cpu")
    _json_option(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("inspect", help="summarise an erasure folder and check its files")
    p.add_argument("folder")
    _json_option(p)
    p.set_defaults(func=cmd_inspect)
    return parser


#: The HTTP client under huggingface_hub logs every request at INFO (``HTTP Request: POST …``); 1.x
#: clients use ``httpx``, 2.x ``httpx2``.
_HTTP_LOGGERS = ("httpx", "httpx2")
#: The transport below it logs connection internals at DEBUG: never wanted, not even with ``-v``.
_TRANSPORT_LOGGERS = ("httpcore", "httpcore2")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    # set both ways: a second ``main()`` in the same process must not inherit the first one's levels
    for name in _HTTP_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)
    for name in _TRANSPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # huggingface_hub resets its level on import
        for noisy in ("transformers", "diffusers", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    token = getattr(args, "token", None)
    # the command line is recorded in the folders it writes: a token given on it never is
    args.command_line = ["erasepro", *(word.replace(token, "***") if token else word for word in argv)]
    _configure_logging(args.verbose)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _print_warning
            if not args.verbose:
                warnings.filterwarnings("ignore", category=FutureWarning)
                warnings.filterwarnings("ignore", message=".*torchvision.*")
            return args.func(args)
    except EraseProError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a path that cannot be read or written: bad input, not a crash
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


def run() -> None:
    """The ``erasepro`` command: :func:`main`, then an exit without the interpreter's teardown.

    Once transformers' model code is imported, tearing the interpreter down module by module takes most of a
    second, after the command has written and closed everything it opened. So the exit handlers run as at any
    exit (logging's flush, the libraries' ``atexit`` hooks, pending ``weakref.finalize`` clean-ups), the
    standard streams are flushed, and the process ends there. An uncaught exception exits the usual way.
    """
    code = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said on it
            pass
    os._exit(0 if code is None else code if isinstance(code, int) else 1)  # as sys.exit(code) would


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
