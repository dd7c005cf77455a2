"""`distill push RUN_DIR/student --repo-id ORG/NAME`: export the student and upload it to the Hub.

`create_repo(exist_ok=True)` then `upload_folder`, through huggingface_hub. The token comes from
`HF_TOKEN` or the user's `hf auth login` and is never printed or written. Transient failures
(HTTP 5xx, 429, 408, dropped connections, timeouts) are retried with exponential backoff; auth
and other client errors are not. The export is finished before any upload starts, so a failed
push leaves it complete and untouched, and the error says what to re-run.

ONNX files (`--onnx`, `--int8`, or the recipe's `hub.export.onnx` / `hub.export.int8`) are
written and parity-gated by the export; a stage whose files fail the gate is not pushed. An
export folder goes only to the repo its card was written for, as its `distill_results.json`
records it. Model repos only: datasets and Spaces are not pushed to.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from huggingface_hub import HfApi, ModelCard, get_token
from huggingface_hub.errors import HFValidationError, HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from distill.config import Config, ConfigError, load_config
from distill.ship.card import CARD_CONFIG_NAME
from distill.ship.evidence import ExportError, repo_name
from distill.ship.export import (
    PLACEHOLDER_ORG,
    RESULTS_NAME,
    add_onnx_arguments,
    export_student,
    exported_for,
    format_files,
    is_export,
    list_files,
    stage_folder,
)

log = logging.getLogger("distill.ship.hub")

T = TypeVar("T")
RETRY_STATUS = {408, 429}  # plus every 5xx


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exception classes of the HTTP clients huggingface_hub may use."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):
            cls = getattr(mod, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
    return tuple(found)


TRANSPORT_ERRORS = _transport_errors()


class PushError(RuntimeError):
    """An upload that did not happen; the message says why and what to re-run."""


def status_of(err: BaseException) -> Optional[int]:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def is_transient(err: BaseException) -> bool:
    """Worth retrying: server errors, rate limits, timeouts, dropped connections (not offline
    mode, which fails the same way every time)."""
    if isinstance(err, OfflineModeIsEnabled):
        return False
    if isinstance(err, HfHubHTTPError):
        status = status_of(err)
        return status is not None and (status >= 500 or status in RETRY_STATUS)
    return isinstance(err, TRANSPORT_ERRORS)


def with_retries(
    call: Callable[[], T],
    what: str,
    attempts: int = 5,
    base_wait: float = 2.0,
    max_wait: float = 30.0,
    sleep: Optional[Callable[[float], None]] = None,
) -> T:
    """Run `call`, retrying transient failures with exponential backoff (Retry-After honoured)."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as err:
            if not is_transient(err) or attempt == attempts:
                raise
            wait = min(max_wait, base_wait * 2 ** (attempt - 1))
            retry_after = getattr(getattr(err, "response", None), "headers", {}).get("Retry-After")
            if retry_after and str(retry_after).isdigit():
                wait = min(max_wait, float(retry_after))
            log.warning(
                "%s failed (%s, attempt %d of %d); retrying in %.0f s",
                what,
                status_of(err) or type(err).__name__,
                attempt,
                attempts,
                wait,
            )
            (sleep or time.sleep)(wait)
    raise AssertionError("unreachable")


def resolve_token() -> str:
    """The Hub token from HF_TOKEN or the stored `hf auth login` token (never printed)."""
    token = get_token()
    if not token:
        raise PushError(
            "no Hugging Face token: set HF_TOKEN to a token with write access, or run "
            "`hf auth login` once on this machine"
        )
    return token


def scrub(text: str, token: Optional[str]) -> str:
    """Hide the token should an error message ever echo it."""
    return text.replace(token, "***") if token else text


def explain(err: BaseException, repo_id: str, token: Optional[str]) -> str:
    status = status_of(err)
    org = repo_id.split("/")[0] if "/" in repo_id else "your user"
    if status == 401:
        why = (
            "the Hub refused the token (401): it is invalid or expired. Log in again with "
            "`hf auth login` or set HF_TOKEN to a valid token"
        )
    elif status == 403:
        why = (
            f"the token may not write to {repo_id} (403): give it write access to '{org}' "
            "(a fine-grained token needs write permission on that namespace)"
        )
    elif isinstance(err, OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it (or set it to 0) to push"
    elif status is not None:
        server = getattr(err, "server_message", None) or str(err).splitlines()[0]
        why = f"the Hub answered {status}: {server}"
    elif is_transient(err):
        why = f"the Hub could not be reached ({type(err).__name__}: {err}), even after retries"
    else:
        why = f"{type(err).__name__}: {err}"
    return scrub(why, token)


def rerun_command(folder: Path, repo_id: str, private: bool, revision: Optional[str]) -> str:
    parts = ["distill push", str(folder), "--repo-id", repo_id]
    if private:
        parts.append("--private")
    if revision:
        parts += ["--revision", revision]
    return " ".join(parts)


def check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PushError(f"--repo-id '{repo_id}' is not a valid Hub repo id: {err}") from None


def default_commit_message(folder: Path) -> str:
    card = ModelCard.load(folder / "README.md")
    name = card.data.model_name or folder.name
    tests = [r for r in (card.data.eval_results or []) if str(r.dataset_split).startswith("test")]
    if tests:
        r = tests[0]
        return f"Upload {name} ({r.metric_type} {float(r.metric_value):.4f} on {r.dataset_split})"
    return f"Upload {name}"


def prepare_folder(
    path: Path, repo_id: str, out: Optional[Path], onnx_options: Optional[dict[str, Any]] = None
) -> tuple[Path, Optional[Config]]:
    """A stage folder is exported for `repo_id` first (with `onnx_options`: export_student's
    onnx, int8, atol, margin, threads); an export folder is used as it is."""
    path = stage_folder(path)
    options = {k: v for k, v in (onnx_options or {}).items() if v is not None}
    if (path / "metrics.json").exists():
        folder = export_student(path, out, repo_id, **options)
        return folder, load_config(folder / CARD_CONFIG_NAME)
    if is_export(path):
        wanted = ["model.onnx"] * bool(options.get("onnx") or options.get("int8")) + ["model.int8.onnx"] * bool(options.get("int8"))
        lacking = [name for name in wanted if not (path / name).exists()]
        if lacking:
            raise PushError(
                f"{path} is an export without {', '.join(lacking)}: push the stage folder with the "
                "same flags (it re-exports), or run `distill export STAGE_DIR --onnx --int8` first"
            )
        written_for = exported_for(path)
        if written_for is None:
            raise PushError(
                f"{path} does not record the repo its card was written for (no repo_id in "
                f"{RESULTS_NAME}; an export from an older distill): push the stage folder instead (it "
                f"re-exports), or run `distill export STAGE_DIR --out {path} --repo-id {repo_id}`"
            )
        if written_for != repo_id:
            raise PushError(
                f"{path} was exported for {written_for}, not {repo_id}: its card would point readers "
                f"at the wrong repo. Push the stage folder instead (it re-exports), or run "
                f"`distill export STAGE_DIR --out {path} --repo-id {repo_id}`"
            )
        return path, load_config(path / CARD_CONFIG_NAME)
    raise PushError(
        f"{path} is neither a finished stage folder (no metrics.json) nor an export (no README.md "
        f"and {CARD_CONFIG_NAME}): pass e.g. runs/demo/student"
    )


def push(
    path: str | Path,
    repo_id: str,
    *,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    dry_run: bool = False,
    out: Optional[str | Path] = None,
    sleep: Optional[Callable[[float], None]] = None,
    onnx_options: Optional[dict[str, Any]] = None,
) -> Optional[str]:
    """Export (when given a stage folder) and upload to `repo_id`; returns the commit URL.

    `private=None` takes the recipe's hub.private. With `dry_run`, nothing leaves the machine:
    the files are listed and the card printed. `onnx_options` (onnx, int8, atol, margin,
    threads; None = the recipe's hub.export) go to the export of a stage folder.
    """
    check_repo_id(repo_id)
    folder, cfg = prepare_folder(Path(path), repo_id, Path(out) if out else None, onnx_options)
    if private is None:
        private = bool(cfg and cfg.hub.private)
    revision = revision or None
    files = list_files(folder)
    target = f"{repo_id} ({'private' if private else 'public'}, revision {revision or 'main'})"
    if dry_run:
        print(f"dry run: would upload {len(files)} files from {folder} to {target}:")
        print(format_files(folder))
        print("\n----- README.md -----")
        print((folder / "README.md").read_text(encoding="utf-8"))
        return None

    token = resolve_token()
    message = commit_message or default_commit_message(folder)
    api = HfApi(token=token)
    try:
        with_retries(
            lambda: api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True),
            "create_repo",
            sleep=sleep,
        )
        if revision and revision != "main":
            with_retries(
                lambda: api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True),
                "create_branch",
                sleep=sleep,
            )
        log.info("uploading %d files to %s", len(files), target)
        info: Any = with_retries(
            lambda: api.upload_folder(
                repo_id=repo_id,
                folder_path=str(folder),
                commit_message=message,
                revision=revision,
                repo_type="model",
            ),
            "upload_folder",
            sleep=sleep,
        )
    except Exception as err:
        if isinstance(err, PushError):
            raise
        raise PushError(
            f"push to {repo_id} failed: {explain(err, repo_id, token)}. The export at {folder} is "
            f"complete and was not changed; to retry, run: "
            f"{rerun_command(folder, repo_id, private, revision)}"
        ) from None
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    print(f"pushed {len(files)} files to https://huggingface.co/{repo_id} ({'private' if private else 'public'}"
          f", revision {revision or 'main'}): {url}")
    return url


def run_org(cfg: Config, sleep: Optional[Callable[[float], None]] = None) -> str:
    """hub.org, else the logged-in user's name."""
    if cfg.hub.org:
        return cfg.hub.org
    api = HfApi(token=resolve_token())
    try:
        who = with_retries(lambda: api.whoami(), "whoami", sleep=sleep)
    except Exception as err:
        raise PushError(
            f"hub.org is unset and the Hub did not say who is logged in ({explain(err, '', None)}); "
            "set hub.org=<org or user>"
        ) from None
    return who["name"]


def push_from_run(cfg: Config, sleep: Optional[Callable[[float], None]] = None) -> Optional[str]:
    """The end of `distill run` with hub.push=true: export `<output_dir>/student` and push it
    to hub.repo_id (the study's naming by default, e.g. dccuchile/albert-base-6-spanish-distilled-pawsx)."""
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, one process uploads
        return None
    stage_dir = Path(cfg.output_dir) / "student"
    repo_id = repo_name(cfg, run_org(cfg, sleep))
    # this run's hub.export, not the one saved with the stage (hub settings may change between
    # a finished training and its push without re-training)
    export = cfg.hub.export
    options = {"onnx": export.onnx, "int8": export.int8, "margin": export.int8_margin}
    return push(stage_dir, repo_id, private=cfg.hub.private, sleep=sleep, onnx_options=options)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="distill push",
        description="Export a trained student (model, tokenizer, recipe, model card) and upload it "
        "to the Hugging Face Hub. The token comes from HF_TOKEN or `hf auth login`.",
        epilog="example: distill push runs/pawsx/student --repo-id dccuchile/albert-base-6-spanish-distilled-pawsx",
    )
    p.add_argument("path", help="a finished stage folder (runs/demo/student) or a folder from `distill export`")
    p.add_argument(
        "--repo-id",
        default=None,
        help="ORG/NAME on the Hub (default: the recipe's hub.repo_id template with hub.org or your user name)",
    )
    p.add_argument("--private", action="store_true", default=None, help="create the repo private (default: the recipe's hub.private)")
    p.add_argument("--revision", default=None, help="branch to push to (created when missing; default main)")
    p.add_argument("--commit-message", default=None, help="commit message (default names the model and its test score)")
    p.add_argument("--dry-run", action="store_true", help="export locally, list the files and print the card; upload nothing")
    p.add_argument("--out", default=None, help="where a stage folder is exported (default: STAGE_DIR/export)")
    add_onnx_arguments(p)
    args = p.parse_args(argv)
    try:
        repo_id = args.repo_id
        if repo_id is None:
            path = stage_folder(args.path)
            recipe = path / "config.yaml" if (path / "config.yaml").exists() else path / CARD_CONFIG_NAME
            if not recipe.exists():
                raise PushError(f"no recipe in {path} to name the repo from: pass --repo-id ORG/NAME")
            cfg = load_config(recipe)
            # a dry run contacts nobody: without hub.org the card says ORG/...
            org = cfg.hub.org or (PLACEHOLDER_ORG if args.dry_run else run_org(cfg))
            repo_id = repo_name(cfg, org)
        push(
            args.path,
            repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            dry_run=args.dry_run,
            out=args.out,
            onnx_options={"onnx": args.onnx, "int8": args.int8, "atol": args.atol, "margin": args.int8_margin,
                          "threads": args.threads},
        )
    except (PushError, ExportError, ConfigError) as err:
        print(f"distill push: {err}", file=sys.stderr)
        return 2
    return 0
