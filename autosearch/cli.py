"""Command line: the same powers as the Python API.

Run ``autosearch <command> --help`` for examples.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from autosearch.errors import AutosearchError, ConfigError, SearchStopped, Stopped

__all__ = ["main"]

_EPILOG = """examples:
  autosearch demo                                  # search the embedded digits CNN (20 trials)
  autosearch search --model model.onnx --data val.npz --study mine --n-trials 40
  autosearch resume mine --n-trials 20             # continue a study where it stopped
  autosearch worker --model model.onnx --study mine --storage postgresql+psycopg://u:p@db/as  # one of N workers
  autosearch front mine                            # the Pareto front as a table
  autosearch analyze --model model.onnx            # units, parameters and FLOPs
  autosearch export mine --pick fastest:0.98 -o out/  # a trial's model, config and verification report
  autosearch dashboard mine -o mine.html           # one offline HTML page of the study

Studies live in ./studies/<name>.db (SQLite) with artifacts in ./studies/<name>/.
"""


def _add_analysis(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-analysis", action="store_true",
                   help="start sampling at once: no latency profile, uniform variants or sensitivity scan first "
                   "(strategy.analysis: false)")
    p.add_argument("--analysis-budget", type=float, default=None, metavar="FRACTION",
                   help="share of the search's wall time the analysis may take (default: the space's "
                   "strategy.analysis_budget, 0.25); the estimate is printed before it starts")


def _strategy(args: argparse.Namespace) -> dict[str, Any]:
    over: dict[str, Any] = {}
    if getattr(args, "no_analysis", False):
        over["analysis"] = False
    if getattr(args, "analysis_budget", None) is not None:
        if not 0 < args.analysis_budget < 1:
            raise ConfigError(f"--analysis-budget {args.analysis_budget} must be a fraction in (0, 1), e.g. 0.25")
        over["analysis_budget"] = args.analysis_budget
    return over


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--studies-dir", default="studies", help="home of study databases and artifacts (default: %(default)s)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///<studies-dir>/<study>.db); "
                   "use postgresql://... to share a study between machines")
    p.add_argument("--artifacts", default=None, metavar="PATH",
                   help="artifact store of the trials' models: a folder (shared between machines, e.g. a mounted volume) "
                   "or s3://bucket (needs boto3); default: the one the study recorded, else <studies-dir>/<study>/artifacts")


def _add_problem(s: argparse.ArgumentParser) -> None:
    """The problem and run options of ``search`` (``worker`` takes the same)."""
    s.add_argument("--model", default="default", help="'default' (the digits CNN), a path to an .onnx file, or (with the [tensorflow] extra) "
                   "a .keras/.h5 file or a SavedModel folder")
    s.add_argument("--data", default=None, help=".npz with x [, y, calib]; omitted: random inputs, fidelity score")
    s.add_argument("--metric", default=None, metavar="METRIC",
                   help="accuracy (needs y); or, without labels, fidelity to the original: scaled_cosine (default: cosine per "
                   "band of channels on one scale, so box pixels cannot hide class scores), cosine, top1 (argmax agreement), "
                   "decision (same side of 0.5), or package.module:function taking (outputs, reference) -> float")
    s.add_argument("--space", default=None, help="preset name (cnn, quant) or YAML path (default: cnn for the default model, quant for ONNX)")
    s.add_argument("--no-convert-onnx", action="store_true",
                   help="do not convert an ONNX model to PyTorch (onnx2torch) to prune it: the prune knob then has no units")
    s.add_argument("--study", default="autosearch", help="study name (default: %(default)s)")
    s.add_argument("--n-trials", type=int, default=None, help="trials to run now (default: the space's budget)")
    s.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    _add_analysis(s)
    s.add_argument("--threads", type=int, default=1, help="intra-op threads of the target (default: %(default)s)")
    s.add_argument("--provider", default="CPUExecutionProvider", help="ONNX Runtime execution provider (default: %(default)s)")
    s.add_argument("--profiler", default=None, metavar="URL",
                   help="time candidates on another device: the URL of `autosearch serve-profiler` running there "
                   "(token from $AUTOSEARCH_PROFILER_TOKEN); candidates are still scored here")
    s.add_argument("--also-target", action="append", default=[], metavar="SPEC",
                   help="time every candidate on this target too (repeatable; the front per target is in `front "
                   "--target LABEL` and the dashboard): comma-separated threads=N, provider=NAME, profiler=URL, "
                   "e.g. --also-target threads=2 --also-target profiler=http://edge:8765")
    _add_common(s)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="autosearch",
        description="Search per-layer pruning, low-rank and precision of a model, with latency measured "
        "by ONNX Runtime on the target (this machine, or a device running `autosearch serve-profiler`), and keep "
        "the Pareto front of accuracy vs latency.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="search the embedded digits CNN and print the front",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="examples:\n  autosearch demo\n  autosearch demo --n-trials 40 --threads 2 --study demo2t\n")
    demo.add_argument("--study", default="demo", help="study name (default: %(default)s); run again to resume")
    demo.add_argument("--n-trials", type=int, default=None, help="trials to run now (default: the space's budget, 20)")
    demo.add_argument("--space", default="cnn", help="preset name or YAML path (default: %(default)s)")
    demo.add_argument("--threads", type=int, default=1, help="intra-op threads of the target (default: %(default)s)")
    demo.add_argument("--studies-dir", default="studies", help="home of study databases and artifacts (default: %(default)s)")
    _add_analysis(demo)

    s = sub.add_parser(
        "search", help="run a search (resumes when the study exists)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  autosearch search --model default --study digits --n-trials 30\n"
        "  autosearch search --model net.onnx --data val.npz --space quant --study net\n"
        "  autosearch search --model net.onnx --data x.npz --metric top1 --study net-fidelity   # no labels\n"
        "  autosearch search --model det.onnx --data pages.npz --metric mytasks.metrics:detection_f1 --study det\n\n"
        "--data is an .npz file: 'x' (or one array per model input, by input name) and, for labelled\n"
        "scoring, 'y'. Optional 'calib' (or 'calib_<input>' per input) holds calibration samples (default: the\n"
        "evaluation samples).\n"
        "An input array with the model input's rank holds samples of batch 1 along axis 0; one with a rank\n"
        "more holds complete inputs (a scalar input as shape (N,), a state [2, 1, 64] as (N, 2, 1, 64)).\n"
        "Without 'y' the score is fidelity to the original model's outputs.\n",
    )
    _add_problem(s)

    w = sub.add_parser(
        "worker", help="join a study as one of several workers (PostgreSQL storage, or SQLite on one machine)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  # 4 workers on one machine, one study in PostgreSQL (the same options as search):\n"
        "  for i in 0 1 2 3; do\n"
        "    autosearch worker --index $i --model net.onnx --data val.npz --study net \\\n"
        "        --storage postgresql+psycopg://user:password@dbhost/autosearch --n-trials 10 &\n"
        "  done; wait\n"
        "  autosearch front net --storage postgresql+psycopg://user:password@dbhost/autosearch\n\n"
        "Each worker runs --n-trials trials with a sampler seed of its own (from --index, default the process id).\n"
        "The first worker to reach a fresh study runs its analysis and warm start; the others wait for it.\n"
        "A worker that dies mid-trial stops its heartbeat: after the grace period the next trial any worker\n"
        "starts marks it FAIL and queues it again with the same parameters (once).\n"
        "Workers on one machine share --studies-dir (the candidate store, the timing lock); on several machines\n"
        "each has its own folder and builds what it samples, and all upload the trials' models to one artifact\n"
        "store (--artifacts /mnt/shared/artifacts, or s3://bucket): export and the dashboard then find any\n"
        "trial's model from any machine by its artifact id.\n",
    )
    _add_problem(w)
    w.add_argument("--index", type=int, default=None, metavar="N",
                   help="this worker's number, distinct between workers (its sampler seed; default: the process id)")

    r = sub.add_parser("resume", help="continue a study created from the CLI",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  autosearch resume demo --n-trials 10\n  autosearch resume net --storage postgresql://user@host/db\n")
    r.add_argument("study", help="study name")
    r.add_argument("--n-trials", type=int, default=None, help="trials to add (default: the space's budget)")
    r.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    _add_common(r)

    f = sub.add_parser("front", help="print the Pareto front (or every trial) of a study",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  autosearch front demo\n  autosearch front demo --all\n  autosearch front demo --csv front.csv\n  autosearch front net --target cpu-2t      # a study searched with --also-target threads=2\n")
    f.add_argument("study", help="study name")
    f.add_argument("--all", action="store_true", help="every trial, failed ones with their reason")
    f.add_argument("--csv", default=None, help="also write the table to this CSV file")
    f.add_argument("--target", default=None, metavar="LABEL",
                   help="the front on a further target of the study (searched with --also-target), e.g. cpu-2t")
    _add_common(f)

    a = sub.add_parser("analyze", help="units with parameters, FLOPs and measured latency share; or a study's analysis",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  autosearch analyze --model default\n  autosearch analyze --model net.onnx --threads 2\n"
                       "  autosearch analyze --model default --sensitivity --study digits   # full scan, kept in the study\n"
                       "  autosearch analyze --study demo     # the sensitivity / latency table a search measured\n\n"
                       "Latency share comes from ONNX Runtime's node profiler on this machine. The sensitivity scan\n"
                       "(score drop per unit and knob value on a subset, uniform int8 variants timed for real) is the\n"
                       "first step of a search; --sensitivity runs only that step into --study, and a later\n"
                       "`autosearch search --study <same name>` with the same model and space starts from it.\n"
                       "`autosearch dashboard <study>` plots it.\n")
    a.add_argument("--model", default="default", help="'default', a path to an .onnx file, a .keras/.h5 file or a SavedModel folder")
    a.add_argument("--sensitivity", action="store_true", help="run the sensitivity scan (needs --study to keep it)")
    a.add_argument("--data", default=None, help="with --sensitivity: .npz with x [, y, calib], as for search")
    a.add_argument("--metric", default=None, metavar="METRIC", help="with --sensitivity: as for search")
    a.add_argument("--space", default=None, help="with --sensitivity: preset or YAML (default: cnn / quant, as for search)")
    a.add_argument("--threads", type=int, default=1, help="intra-op threads for the profile (default: %(default)s)")
    a.add_argument("--study", default=None, help="print the analysis stored in this study instead")
    a.add_argument("--csv", default=None, help="also write the table to this CSV file")
    _add_common(a)

    e = sub.add_parser(
        "export", help="export a trial's model with its config and a verification report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  autosearch export demo                             # the knee of the front, to ./demo-trial<N>/\n"
        "  autosearch export demo --pick fastest:0.98 -o fast/  # fastest trial with accuracy >= 0.98\n"
        "  autosearch export demo --pick 12 -o trial12/       # a trial by number\n\n"
        "RULE: a trial number; fastest (fastest feasible trial); fastest:<min accuracy>; smallest;\n"
        "smallest:<min accuracy>; knee (the front point farthest from the line joining its ends).\n"
        "The folder gets model.onnx, config.yaml, metrics.json, report.md and report.json: the exported file\n"
        "re-loaded, re-scored and timed side by side with the float model, and whether that agrees with the study.\n",
    )
    e.add_argument("study", help="study name")
    e.add_argument("--pick", default="knee", metavar="RULE", help="which trial (default: %(default)s); see below")
    e.add_argument("-o", "--out", default=None, metavar="DIR", help="output folder (default: ./<study>-trial<N>)")
    e.add_argument("--force", action="store_true", help="replace an earlier export in that folder (one holding a model.onnx)")
    e.add_argument("--latency-tolerance", type=float, default=None, metavar="FRACTION",
                   help="how far the re-measured latency or speedup may be from the study's and still agree "
                   "(default: 0.15); raise it on a busy machine")
    _add_common(e)

    d = sub.add_parser(
        "dashboard", help="write one self-contained HTML dashboard of a study (works offline)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  autosearch dashboard demo                    # ./demo-dashboard.html\n"
        "  autosearch dashboard demo -o reports/demo.html\n\n"
        "The page shows the Pareto scatter, per-unit knob heatmaps of the front, the hypervolume over trials,\n"
        "the per-unit analysis when the study has one, failed trials with their reasons and the front as a table.\n"
        "The study is only read: optuna-dashboard still opens it.\n",
    )
    d.add_argument("study", help="study name")
    d.add_argument("-o", "--out", default=None, metavar="FILE", help="HTML file to write (default: ./<study>-dashboard.html)")
    _add_common(d)

    sp = sub.add_parser(
        "serve-profiler", help="time candidates on this device for a search on another machine",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  # on the device (an edge box, a server of another CPU generation):\n"
        "  export AUTOSEARCH_PROFILER_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(16))')\n"
        "  autosearch serve-profiler                      # 127.0.0.1:8765, reachable through an SSH tunnel\n"
        "  autosearch serve-profiler --host 0.0.0.0 --port 8765   # on a trusted network only\n"
        "  # on the machine that searches:\n"
        "  ssh -N -L 8765:127.0.0.1:8765 device &          # or expose it behind a TLS reverse proxy\n"
        "  AUTOSEARCH_PROFILER_TOKEN=... autosearch search --model net.onnx --data val.npz --study net \\\n"
        "      --profiler http://127.0.0.1:8765\n\n"
        "The device runs ONNX Runtime only: it receives each candidate's ONNX file and the example input,\n"
        "measures it with the same protocol as a local target (warm-up, median until precise, interleaved rounds\n"
        "for the front) and answers with the statistics and its description (CPU model and int8 flags, ORT version,\n"
        "providers). One measurement at a time; others wait up to --queue-timeout seconds. A token is required,\n"
        "uploads are size-limited, models with external data are refused, files are deleted after use.\n"
        "What one request may ask is limited (--max-threads, --max-runs, --max-seconds); a request over a limit\n"
        "gets 400 with the limit and the option. Each measurement runs in its own process, killed past\n"
        "--deadline-s (answer 504), when the client disconnects, or on SIGTERM / Ctrl-C (the server stops within\n"
        "seconds and removes its upload folder).\n"
        "For TLS, put a reverse proxy in front (e.g. Caddy: `reverse_proxy 127.0.0.1:8765`) and pass https://.\n",
    )
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    sp.add_argument("--port", type=int, default=8765, help="port (default: %(default)s)")
    sp.add_argument("--token-file", default=None, metavar="FILE",
                    help="file holding the token (default: $AUTOSEARCH_PROFILER_TOKEN)")
    sp.add_argument("--max-upload-mb", type=float, default=256.0, help="largest request accepted (default: %(default)s MB)")
    sp.add_argument("--queue-timeout", type=float, default=600.0, metavar="SECONDS",
                    help="how long a request waits for the one measurement slot (default: %(default)s)")
    sp.add_argument("--max-threads", type=int, default=None, metavar="N",
                    help="intra-op threads one request may ask at most (default and ceiling: this device's cores)")
    sp.add_argument("--max-runs", type=int, default=100_000, metavar="N",
                    help="warm-up, timed or profiled runs of one measurement at most (default: %(default)s)")
    sp.add_argument("--max-seconds", type=float, default=60.0, metavar="SECONDS",
                    help="time budget (max_seconds) one measurement may ask at most (default: %(default)s)")
    sp.add_argument("--deadline-s", type=float, default=300.0, metavar="SECONDS",
                    help="the longest one request may hold the device: past it the measurement is killed and the "
                    "answer is 504 (default: %(default)s)")
    return ap


def _target_spec(raw: str) -> dict[str, Any]:
    """``threads=2,provider=X,profiler=URL`` -> a mapping (one line naming the bad part, credentials hidden)."""
    from autosearch.remote import redact_url

    text = ",".join(f"profiler={redact_url(p.strip()[len('profiler='):])}" if p.strip().startswith("profiler=") else p
                    for p in raw.split(","))  # what messages show
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        key, sep, val = part.partition("=")
        if not sep or key not in ("threads", "provider", "profiler"):
            raise ConfigError(f"--also-target {text!r}: {part!r} is not threads=N, provider=NAME or profiler=URL")
        if key == "threads":
            if not val.isdigit() or int(val) < 1:
                raise ConfigError(f"--also-target {text!r}: threads must be a positive integer, got {val!r}")
            out[key] = int(val)
        else:
            out[key] = val
    if not out:
        raise ConfigError("--also-target needs at least one of threads=N, provider=NAME, profiler=URL")
    return out


def _make_target(spec: dict[str, Any], studies_dir: str) -> Any:
    from autosearch.target import Target

    provider = (spec.get("provider", "CPUExecutionProvider"),)
    if spec.get("profiler"):
        from autosearch.remote import RemoteTarget, full_url

        return RemoteTarget(full_url(str(spec["profiler"])), providers=provider, threads=int(spec.get("threads", 1)))
    return Target(providers=provider, threads=int(spec.get("threads", 1)), lock_path=str(Path(studies_dir) / ".profile.lock"))


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    """The problem of a search (stored in the study so `resume` can rebuild it)."""
    if args.model == "default":
        spec: dict[str, Any] = {"kind": "default", "space": args.space or "cnn"}
    else:
        spec = {"kind": "onnx", "path": str(Path(args.model).resolve()), "space": args.space or "quant",
                "data": str(Path(args.data).resolve()) if args.data else None, "metric": args.metric}
    spec.update(threads=args.threads, provider=getattr(args, "provider", "CPUExecutionProvider"))
    if getattr(args, "profiler", None):
        spec["profiler"] = args.profiler
    if getattr(args, "no_convert_onnx", False):
        spec["convert_onnx"] = False
    if getattr(args, "also_target", None):
        spec["also"] = [_target_spec(t) for t in args.also_target]
    if _strategy(args):
        spec["strategy"] = _strategy(args)
    return spec


def _run_search(spec: dict[str, Any], *, study: str, storage: str | None, studies_dir: str, n_trials: int | None,
                timeout: float | None, show_front: bool = True, worker: int | None = None,
                artifacts: str | None = None) -> None:
    from autosearch.problem import load_problem
    from autosearch.report import print_front
    from autosearch.space import load_space
    from autosearch.study import search

    model, evaluator, example = load_problem(spec)
    if spec.get("convert_onnx") is False and spec.get("kind") == "onnx":
        from autosearch.model import import_model

        model = import_model(model, example, convert_onnx=False)
    space = load_space(spec.get("space"))
    if spec.get("strategy"):
        space = space.with_strategy(**spec["strategy"])
    target: Any = _make_target(spec, studies_dir)
    if spec.get("also"):
        target = [target, *(_make_target(t, studies_dir) for t in spec["also"])]
    st = search(model, evaluator, example_inputs=example, space=space, target=target, study_name=study,
                storage=storage, n_trials=n_trials, timeout=timeout, studies_dir=studies_dir, cli_spec=_stored(spec), worker=worker,
                artifact_store=artifacts)
    if show_front:
        print_front(st)


def _stored(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as the study keeps it: profiler URLs without their credentials (``AUTOSEARCH_PROFILER_URL``
    gives them back on resume)."""
    from autosearch.remote import redact_url

    out = dict(spec)
    if out.get("profiler"):
        out["profiler"] = redact_url(str(out["profiler"]))
    if out.get("also"):
        out["also"] = [{**t, "profiler": redact_url(str(t["profiler"]))} if t.get("profiler") else dict(t) for t in out["also"]]
    return out


def _check_args(args: argparse.Namespace) -> None:
    """Arguments every command shares, checked before any model is loaded."""
    n = getattr(args, "n_trials", None)
    if n is not None and n < 1:
        raise ConfigError(f"--n-trials {n}: run at least 1 trial (leave --n-trials out for the space's budget)")
    t = getattr(args, "timeout", None)
    if t is not None and not t > 0:  # NaN too
        raise ConfigError(f"--timeout {t:g}: give a number of seconds > 0, e.g. --timeout 600 (leave it out for the "
                          "space's budget.timeout_s)")
    _check_paths(args)
    if getattr(args, "study", None) is not None or getattr(args, "storage", None):
        from autosearch.study import check_storage_url, check_study_name

        if getattr(args, "study", None) is not None:
            check_study_name(args.study)
        if getattr(args, "storage", None):
            check_storage_url(args.storage)


def _existing(path: Path) -> Path:
    """``path`` or the nearest folder above it that exists."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable(path: str | Path, option: str, *, folder: bool) -> None:
    """``path`` (a folder, or a file when ``folder`` is false) can be made or written here, else one line naming the fix."""
    p = Path(path)
    if p.exists() and folder and not p.is_dir():
        raise ConfigError(f"{option} {str(p)!r} is a file, not a folder: pass a folder (it is created when missing)")
    if p.is_dir() and not folder:
        example = p / ("dashboard.html" if option.startswith("-o") else "table.csv")
        raise ConfigError(f"{option} {str(p)!r} is a folder: name a file in it, e.g. {str(example)!r}")
    top = _existing(p if folder or not p.exists() else p.parent)
    if not top.is_dir():
        raise ConfigError(f"{option} {str(p)!r} lies below {str(top)!r}, which is a file, not a folder: choose another path")
    if not os.access(top, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ConfigError(f"{option} {str(p)!r}: {str(top)!r} is not writable (a read-only file system or no permission): "
                          f"pass a writable place with {option}, or run from a writable folder")


def _check_paths(args: argparse.Namespace) -> None:
    """File-system mistakes refused before any work: a file where a folder goes (or the reverse), a read-only place."""
    cmd = args.command
    studies = getattr(args, "studies_dir", None)
    if studies is not None:
        writes = cmd in ("demo", "search", "worker", "resume") or (cmd == "analyze" and getattr(args, "sensitivity", False))
        if writes:
            _check_writable(studies, "--studies-dir", folder=True)
            db = Path(studies) / f"{getattr(args, 'study', '')}.db"
            if not getattr(args, "storage", None) and db.exists() and not os.access(db, os.W_OK):
                raise ConfigError(f"the study database {str(db)!r} is not writable (read-only file system or no permission): "
                                  "copy the studies folder somewhere writable and pass --studies-dir")
        elif Path(studies).exists() and not Path(studies).is_dir():
            raise ConfigError(f"--studies-dir {studies!r} is a file, not a folder: pass the folder the studies are in")
    arts = getattr(args, "artifacts", None)
    if arts and "://" not in str(arts):
        if cmd in ("demo", "search", "worker", "resume"):
            _check_writable(arts, "--artifacts", folder=True)
        elif Path(arts).exists() and not Path(arts).is_dir():
            raise ConfigError(f"--artifacts {arts!r} is a file, not a folder: pass the artifact folder (or s3://bucket)")
    if getattr(args, "csv", None):
        _check_writable(args.csv, "--csv", folder=False)
    if cmd == "export":
        _check_writable(args.out or ".", "-o/--out", folder=True)
        if studies is not None and Path(studies).is_dir() and not os.access(studies, os.W_OK):
            raise ConfigError(f"the studies folder {studies!r} is not writable (a read-only file system or no permission) and "
                              "export times the model under its lock file: copy the folder somewhere writable and pass "
                              "--studies-dir")
    if cmd == "dashboard":
        _check_writable(args.out or ".", "-o/--out", folder=not args.out)


def _os_error(exc: OSError) -> str:
    """A file-system error as one line with the fix."""
    where = f" at {exc.filename}" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return f"no space left on device{where}; free space or use --studies-dir on another disk"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where} ({exc.strerror}): run from a writable folder, or pass --studies-dir / -o to one"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"a file is in the way{where} ({exc.strerror}): choose a path whose folders are folders"
    if exc.errno == errno.EISDIR:
        return f"{exc.filename or 'the path'} is a folder ({exc.strerror}): name a file"
    if exc.errno == errno.ENAMETOOLONG:
        return f"a path is too long for the file system{where}: use a shorter study name or folder"
    return f"{exc.strerror or exc}{where}: check the path and its permissions"


def _cmd(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.command == "demo":
        spec = {"kind": "default", "space": args.space, "threads": args.threads}
        if _strategy(args):
            spec["strategy"] = _strategy(args)
        _run_search(spec, study=args.study, storage=None, studies_dir=args.studies_dir, n_trials=args.n_trials, timeout=None)
        return 0
    if args.command == "search":
        _run_search(_spec(args), study=args.study, storage=args.storage, studies_dir=args.studies_dir,
                    n_trials=args.n_trials, timeout=args.timeout, artifacts=args.artifacts)
        return 0
    if args.command == "worker":
        import os

        _run_search(_spec(args), study=args.study, storage=args.storage, studies_dir=args.studies_dir,
                    n_trials=args.n_trials, timeout=args.timeout, show_front=False,
                    worker=os.getpid() if args.index is None else args.index, artifacts=args.artifacts)
        return 0
    if args.command == "resume":
        from autosearch.study import Study

        st = Study.load(args.study, args.storage, studies_dir=args.studies_dir, artifact_store=args.artifacts)
        saved = st.optuna_study.user_attrs.get("cli_spec")
        if not saved:
            raise ConfigError(
                f"study {args.study!r} was created from Python, so the CLI does not know its model: "
                "resume it by calling autosearch.search(...) again with the same study_name"
            )
        _run_search(dict(saved), study=args.study, storage=args.storage, studies_dir=args.studies_dir,
                    n_trials=args.n_trials, timeout=args.timeout, artifacts=args.artifacts)
        return 0
    if args.command == "front":
        from autosearch.report import format_front, print_front
        from autosearch.study import Study

        st = Study.load(args.study, args.storage, studies_dir=args.studies_dir, artifact_store=args.artifacts)
        if args.target:
            df = st.front(target=args.target)
            cols = ["trial", "accuracy", "latency_ms", f"speedup@{args.target}", "size_mb", "config"]
            print(f"front of study {args.study!r} on {args.target} ({len(df)} trial(s)):")
            print(df[[c for c in cols if c in df]].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        elif args.all:
            print(format_front(st, all_trials=True))
        else:
            print_front(st)
        if args.csv:
            from autosearch.artifacts import atomic_write_text

            atomic_write_text(args.csv, (st.trials() if args.all else st.front(target=args.target)).to_csv(index=False))
            print(f"wrote {args.csv}")
        return 0
    if args.command == "analyze":
        import tempfile

        from autosearch.analysis import latency_by_unit, quant_units, units_frame
        from autosearch.model import import_model

        if args.sensitivity:
            if not args.study:
                raise ConfigError("--sensitivity keeps its results in a study: add --study NAME "
                                  "(then `autosearch search --study NAME` starts from them)")
            _run_search(_spec(args), study=args.study, storage=args.storage, studies_dir=args.studies_dir,
                        n_trials=0, timeout=None, show_front=False, artifacts=args.artifacts)
        if args.study:
            from autosearch.study import Study

            st = Study.load(args.study, args.storage, studies_dir=args.studies_dir, artifact_store=args.artifacts)
            blob = st.optuna_study.user_attrs.get("analysis")
            df = st.analysis()
            if df is None or blob is None:  # None together: st.analysis() reads the same attribute
                raise ConfigError(f"study {args.study!r} has no analysis: it ran with strategy.analysis false; "
                                  "run `autosearch analyze --sensitivity --study <new name>` for one")
            print(f"analysis of study {args.study!r} ({blob['seconds']:.0f} s); uniform int8 variants:")
            for u in blob["uniform"]:
                print("  ", u)
        else:
            if args.model == "default":
                from autosearch.demo import default_problem

                model, _, example = default_problem()
                src = import_model(model, example)
            else:
                src = import_model(args.model)
            units = quant_units(src.onnx_model, by_module=src.origin == "torch")
            df = units_frame(units)
            with tempfile.TemporaryDirectory() as tmp:
                path = src.save(Path(tmp) / "model.onnx")
                ms = latency_by_unit(str(path), src.example_feed, units=[u.name for u in units],
                                     by_module=src.origin == "torch", threads=args.threads)
            total = sum(ms.values()) or 1.0
            df["latency_ms"] = [ms.get(u, 0.0) for u in df["unit"]]
            df["latency_share"] = df["latency_ms"] / total
            print(f"measured total {total:.3f} ms per inference; {ms.get('(other)', 0.0) / total:.1%} outside these units")
        print(df.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if args.csv:
            from autosearch.artifacts import atomic_write_text

            atomic_write_text(args.csv, df.to_csv(index=False))
            print(f"wrote {args.csv}")
        return 0
    if args.command == "export":
        from autosearch.export import export_trial, pick_trial
        from autosearch.study import Study

        st = Study.load(args.study, args.storage, studies_dir=args.studies_dir, artifact_store=args.artifacts)
        number = pick_trial(st, args.pick)
        out = args.out or f"{args.study}-trial{number}"
        extra = {} if args.latency_tolerance is None else {"latency_tolerance": args.latency_tolerance}
        report = export_trial(st, args.pick, out, force=args.force, **extra)
        print(report.table())
        print(f"wrote {', '.join(str(p) for p in report.files.values())}")
        return 0
    if args.command == "serve-profiler":
        import os

        from autosearch.profiler import serve

        token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get("AUTOSEARCH_PROFILER_TOKEN", "")
        if not token:
            raise ConfigError("serve-profiler needs a token: set AUTOSEARCH_PROFILER_TOKEN or pass --token-file FILE")
        from autosearch.profiler import Limits
        from autosearch.target import cpu_cores

        limits = Limits(max_threads=args.max_threads or cpu_cores(), max_runs=args.max_runs, max_seconds=args.max_seconds,
                        deadline_s=args.deadline_s, max_upload_mb=args.max_upload_mb, queue_timeout_s=args.queue_timeout)
        print(f"autosearch profiler on http://{args.host}:{args.port} (one measurement at a time, up to {limits.max_threads} "
              f"thread(s), {limits.deadline_s:g} s per request; Ctrl-C stops it)", flush=True)
        serve(host=args.host, port=args.port, token=token, limits=limits)
        return 0
    if args.command == "dashboard":
        from autosearch.dashboard import write_dashboard
        from autosearch.study import Study

        st = Study.load(args.study, args.storage, studies_dir=args.studies_dir, artifact_store=args.artifacts)
        path = write_dashboard(st, args.out or f"{args.study}-dashboard.html")
        print(f"wrote {path} (one self-contained HTML file; open it in a browser, no network needed)")
        return 0
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autosearch`` command."""
    ap = _parser()
    args = ap.parse_args(argv)
    if not args.command:
        ap.print_help()
        return 2
    stoppable = args.command in _STOPPABLE and threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _on_sigterm) if stoppable else None
    try:
        return _cmd(args)
    except SearchStopped as exc:
        study = getattr(args, "study", None) or "<study>"
        print(f"autosearch: stopped: {exc} (`autosearch resume {study}`)", file=sys.stderr)
        return 75
    except AutosearchError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"autosearch: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file-system mistake no check caught: one line, not a traceback
        if args.debug:
            traceback.print_exc()
        print(f"autosearch: error: {_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        study = getattr(args, "study", None) or "<study>"
        how = f"stopped by {exc.signal_name}" if isinstance(exc, Stopped) else "interrupted"
        print(f"\nautosearch: {how}; finished trials are saved, resume with `autosearch resume {study}`", file=sys.stderr)
        return 143 if isinstance(exc, Stopped) else 130
    finally:
        if stoppable:
            signal.signal(signal.SIGTERM, before)


# commands that run trials: SIGTERM stops them as Ctrl-C does (the running trial FAIL with the reason, exit 143)
_STOPPABLE = ("demo", "search", "resume", "worker", "analyze")


def _on_sigterm(signum: int, frame: Any) -> None:
    del signum, frame
    raise Stopped("SIGTERM")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
