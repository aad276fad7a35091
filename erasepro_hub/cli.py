"""The ``erasepro`` command line: thin commands, errors translated once.

Exit codes: 0 ok, 1 a check ran and failed, 2 bad input (the message names the
problem and the fix). Data goes to stdout, diagnostics and progress to stderr.
Heavy libraries are imported only by the command that needs them.

Why one module of this length: one small function per command plus the parser; each command
is a few lines over the library, and keeping them together shows the whole command surface at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import EraseProError


def _solve_progress(desc: str):
    """A progress bar on stderr (hidden when stderr is not a terminal) and its per-stage callback."""
    from tqdm.auto import tqdm

    bar = tqdm(desc=desc, unit="stage", file=sys.stderr, leave=False, disable=None)
    return bar, lambda name: bar.update(1)


def _print_summary(path: Path) -> None:
    from .manifest import load_manifest

    manifest = load_manifest(path / "erasepro.yaml")
    m = manifest.metrics or {}
    print(f"wrote {path}", file=sys.stderr)
    for key in ("anchor_similarity", "anchor_similarity_no_edit", "preserve_similarity", "preserve_similarity_min"):
        if m.get(key) is not None:
            print(f"  {key:26s} {m[key]:.4f}", file=sys.stderr)
    for key in ("residual_train", "residual_heldout", "preserve_drift", "pooled_residual_train"):
        if m.get(key) is not None:
            print(f"  {key:26s} {m[key]:.3e}", file=sys.stderr)


def cmd_erase(args: argparse.Namespace) -> int:
    from .erase import erase

    bar, step = _solve_progress("erase")
    try:
        out = erase(
            args.manifest, args.out, overwrite=args.overwrite, device=args.device, progress=step,
            command=args.command_line,
        )
    finally:
        bar.close()
    _print_summary(out)
    print(out)
    return 0


def cmd_regenerate(args: argparse.Namespace) -> int:
    from .verification import regenerate, verify

    bar, step = _solve_progress("regenerate")
    try:
        if not args.verify:
            out = regenerate(
                args.folder, out=args.out, overwrite=args.overwrite, device=args.device, progress=step,
                command=args.command_line,
            )
        else:
            result = verify(args.folder, device=args.device, progress=step)
    finally:
        bar.close()
    if not args.verify:
        _print_summary(out)
        print(out)
        return 0
    summary = {
        "folder": str(result.folder),
        "ok": result.ok,
        "max_abs_diff": result.max_abs_diff,
        "atol": result.atol,
        "problems": result.problems,
    }
    print(json.dumps(summary, indent=2))
    if result.ok:
        print(f"verified: max |ΔW_stored − ΔW_regenerated| = {result.max_abs_diff:.3e} ≤ {result.atol:.3e}", file=sys.stderr)
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
    from .layout import MANIFEST_FILE
    from .manifest import load_manifest

    folder = Path(args.folder)
    manifest = load_manifest(folder / MANIFEST_FILE if folder.is_dir() else folder)
    integrity, problem = "ok", None
    try:
        if folder.is_dir():
            check_files(folder, manifest)
            open_folder(folder)
    except (VerificationError, AdapterFormatError) as exc:  # a damaged adapter is a failed integrity check too
        integrity, problem = "FAILED", str(exc)
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
        "text_encoder_sites": sum(1 for s in sites if s.update_rank and not s.name.startswith("unet.")),
        "total_rank": sum(s.update_rank for s in sites),
        "max_site_residual": max((s.residual for s in sites), default=None),
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
    from .api import push

    result = push(args.folder, args.repo_id, private=args.private, branch=args.branch, tag=args.tag)
    state = "new commit" if result.new_commit else "unchanged, no new commit"
    print(f"pushed {args.folder} to {result.repo_id} ({result.branch}{', tag ' + result.tag if result.tag else ''}): {state}", file=sys.stderr)
    print(f"  load with revision={result.commit!r}", file=sys.stderr)
    print(result.commit)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .hub.pull import pull

    result = pull(args.ref, args.out, overwrite=args.overwrite)
    print(f"pulled {result.repo_id}@{result.revision} = commit {result.commit} into {result.folder} (verified)", file=sys.stderr)
    print(result.folder)
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from .adapters.folder import open_folder
    from .cards import write_card

    opened = open_folder(args.folder)
    names = write_card(opened.path, opened.manifest, repo_id=args.repo_id, revision=args.revision)
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
    summary = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    for key in ("baseline_uce", "images"):
        if key in metrics:
            summary[key] = {k: v for k, v in metrics[key].items() if not isinstance(v, dict)}
    print(json.dumps(summary, indent=2))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .evaluation import compare, markdown_table, parse_variant, write_comparison

    variants = [parse_variant(m) for m in (args.methods.split(",") if args.methods else [])]
    variants += [parse_variant(v) for v in args.variant or []]
    if not variants:
        variants = [parse_variant(m) for m in ("uce", "erasepro-kv", "erasepro")]
    bar, step = _solve_progress("compare")
    try:
        rows = compare(args.manifests, variants, prompts=args.prompts, device=args.device, progress=step)
    finally:
        bar.close()
    if args.out:
        for path in write_comparison(rows, args.out, command=args.command_line):
            print(f"wrote {path}", file=sys.stderr)
    print(markdown_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="erasepro",
        description="Closed-form concept erasure for Stable Diffusion, as verifiable, regenerable adapters.",
    )
    parser.add_argument("--version", action="version", version=f"erasepro_hub {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="more diagnostics on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("erase", help="solve a manifest and write the erasure folder")
    p.add_argument("manifest", help="the manifest (.yaml)")
    p.add_argument("--out", help="output folder (default: erasures/<name>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--device", default="cpu", help="torch device for the text encoders (default: cpu)")
    p.set_defaults(func=cmd_erase)

    p = sub.add_parser("regenerate", help="recompute an erasure from DIR/erasepro.yaml")
    p.add_argument("folder", help="an erasure folder (or its erasepro.yaml), or a Hub reference user/name[@rev]")
    p.add_argument("--verify", action="store_true", help="compare with the stored adapter: exit 0 if within tolerance, else 1")
    p.add_argument("--out", help="where to write the regenerated folder (without --verify; default: DIR-regenerated)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_regenerate)

    p = sub.add_parser("push", help="publish an erasure folder to the Hub in one commit")
    p.add_argument("folder")
    p.add_argument("repo_id", help="user/name or org/name")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--branch", help="commit to this branch (created if missing; default main)")
    p.add_argument("--tag", help="tag the commit")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("pull", help="download an erasure by revision, verified")
    p.add_argument("ref", metavar="REPO_ID[@REV]", help="user/name, optionally @branch, @tag or @commit")
    p.add_argument("--out", help="output folder (default: the repository name)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("card", help="(re)render the model card and plot of an erasure folder")
    p.add_argument("folder")
    p.add_argument("--repo-id", help="the repository the card should point to")
    p.add_argument("--revision", help="the revision the card's snippet loads (default main)")
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
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="run methods and setting variants on the same prompts, side by side")
    p.add_argument("manifests", nargs="+", help="one or more manifests (one table section each)")
    p.add_argument("--methods", help="comma-separated methods, e.g. uce,erasepro-kv,erasepro (the default)")
    p.add_argument("--variant", action="append", help="a named variant: NAME:key=value[,key=value] (dotted manifest keys)")
    p.add_argument("--prompts", help="extra held-out/preserve prompts, as for eval")
    p.add_argument("--out", help="write compare.md and compare.json into this folder")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("inspect", help="summarise an erasure folder and check its files")
    p.add_argument("folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_inspect)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        for noisy in ("transformers", "diffusers", "huggingface_hub", "httpx"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = ["erasepro", *argv]
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
