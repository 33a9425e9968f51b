"""Remote vs local timing: does `autosearch serve-profiler` report what a local target measures?

Starts the profiler on 127.0.0.1 (a real uvicorn process), then for each model measures, in one run and
interleaved round by round, the local target and the remote one on the same machine: the ratio remote/local
of the medians should sit near 1.0 (the HTTP transfer is outside the timed region), and the fronts a search
finds should not depend on where the timing happens. Quote the CPU and the load average with the figures.

    .venv/bin/python benchmarks/remote.py                      # digits CNN float + int8, MiniLM-sized MLPs
    .venv/bin/python benchmarks/remote.py --rounds 9 --out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _models(tmp: Path, *, default_cnn: bool) -> list[tuple[str, Path, dict[str, np.ndarray]]]:
    from conftest import tiny_onnx

    from autosearch.build import build_candidate
    from autosearch.candidate import Candidate
    from autosearch.evaluate import LabelledEvaluator
    from autosearch.model import import_model
    from autosearch.zoo import load_digits_data, pretrained_digits_cnn

    out = []
    for hidden in (256, 2048):
        p = tiny_onnx(tmp / f"mlp{hidden}.onnx", hidden=hidden)
        out.append((f"MLP 16-{hidden}-10, float", p, {"x": np.zeros((1, 16), np.float32)}))
    data = load_digits_data()
    # the default CNN trains for minutes on first use; the tests' narrow one in seconds
    model = pretrained_digits_cnn() if default_cnn else pretrained_digits_cnn(epochs=4, widths=(8, 16, 16), verbose=False)
    ev = LabelledEvaluator(data.x_test, data.y_test, calibration=data.x_train)
    src = import_model(model, data.x_test[:1])
    name = "digits CNN" if default_cnn else "digits CNN 8/16/16"
    base = src.save(tmp / "cnn.onnx")
    out.append((f"{name}, float", base, src.example_feed))
    from autosearch.analysis import quant_units

    units = [u.name for u in quant_units(src.onnx_model, by_module=True)]
    built = build_candidate(src, Candidate(bits={u: 8 for u in units}, quant={"mode": "static"}), tmp / "int8",
                            units={"bits": units}, calibration=ev.calibration_feeds(64, src.input_names))
    out.append((f"{name}, static int8", built.path, src.example_feed))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per model (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="append the table to this markdown file")
    ap.add_argument("--default-cnn", action="store_true", help="the default digits CNN (trains on first use) instead of the narrow one")
    args = ap.parse_args(argv)

    from autosearch.remote import RemoteTarget
    from autosearch.target import Target, cpu_flags, cpu_name

    token = "bench-token"
    port = _port()
    env = {**os.environ, "AUTOSEARCH_PROFILER_TOKEN": token}
    proc = subprocess.Popen([sys.executable, "-m", "autosearch", "serve-profiler", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    remote = RemoteTarget(url, token=token, threads=args.threads, max_seconds=1.0)
    local = Target(threads=args.threads, max_seconds=1.0)
    try:
        for _ in range(300):
            try:
                remote.describe()
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.1)
        load0 = os.getloadavg()[0]
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for label, path, feed in _models(Path(tmp), default_cnn=args.default_cnn):
                loc, rem = [], []
                for _ in range(args.rounds):  # interleaved: local, remote, local, remote ...
                    loc.append(local.profile(path, feed).median_ms)
                    rem.append(remote.profile(path, feed).median_ms)
                lm, rm = float(np.median(loc)), float(np.median(rem))
                rows.append((label, lm, rm, rm / lm))
                print(f"{label:28s} local {lm:8.3f} ms  remote {rm:8.3f} ms  remote/local {rm / lm:.3f}", flush=True)
        load1 = os.getloadavg()[0]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    lines = [
        "",
        f"## Remote vs local timing ({time.strftime('%Y-%m-%d')})",
        "",
        (f"Command: `.venv/bin/python benchmarks/remote.py --rounds {args.rounds} --threads {args.threads}`. CPU: {cpu_name()} "
         f"({', '.join(cpu_flags()) or 'no int8 flags read'}); 1-minute load average {load0:.1f} at the start, {load1:.1f} at "
         "the end, on 2 cores. The profiler ran on the same machine (127.0.0.1); each row is the median of the rounds' "
         "medians, local and remote interleaved round by round."),
        "",
        "| model | local ms | remote ms | remote / local |",
        "|---|---|---|---|",
        *[f"| {lbl} | {lm:.3f} | {rm:.3f} | {r:.3f} |" for lbl, lm, rm, r in rows],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
