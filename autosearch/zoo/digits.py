"""The embedded default model: a small ResNet on scikit-learn's bundled digits.

The 8x8 digits are upsampled to 32x32 so the convolutions have real work to
do. Training is deterministic for a given torch thread count (fixed seed,
single-threaded reductions where it matters; one thread and two give different
weights under the same cache key) and takes minutes on two cores (about 10 on a shared 2-core AMD
EPYC); with ``verbose`` it prints an estimate after the first batches and one
line per epoch. The weights are cached under ``~/.cache/autosearch`` (or
``$AUTOSEARCH_CACHE``) so later runs start at once.

Example:
    >>> from autosearch.zoo import pretrained_digits_cnn, load_digits_data
    >>> model = pretrained_digits_cnn()          # doctest: +SKIP
    >>> data = load_digits_data()                # doctest: +SKIP
    >>> data.x_test.shape                        # doctest: +SKIP
    (450, 1, 32, 32)
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitsData", "DigitsResNet", "cache_dir", "load_digits_data", "pretrained_digits_cnn"]

_WIDTHS = (32, 64, 128)
_SEED = 0
_EPOCHS = 12


def cache_dir() -> Path:
    """Directory for cached artifacts (``$AUTOSEARCH_CACHE`` or ``~/.cache/autosearch``)."""
    root = os.environ.get("AUTOSEARCH_CACHE") or os.path.join(Path.home(), ".cache", "autosearch")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn plus a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Stem + 6 BasicBlocks (widths 32/64/128) + linear head; about 0.7M parameters."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = _WIDTHS) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(nn.Conv2d(1, w1, 3, padding=1, bias=False), nn.BatchNorm2d(w1), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(w1, w1, 1), BasicBlock(w1, w1, 1))
        self.layer2 = nn.Sequential(BasicBlock(w1, w2, 2), BasicBlock(w2, w2, 1))
        self.layer3 = nn.Sequential(BasicBlock(w2, w3, 2), BasicBlock(w3, w3, 1))
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


@dataclass(frozen=True)
class DigitsData:
    """Digits upsampled to 32x32, float32 NCHW in [0, 1], stratified train/test split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_data(*, test_size: int = 450, seed: int = _SEED) -> DigitsData:
    """Load scikit-learn's bundled digits (no download), upsampled to 1x32x32.

    Args:
        test_size: Number of held-out images (stratified).
        seed: Split seed.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False).numpy()
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_size, stratify=labels, random_state=seed
    )
    return DigitsData(
        np.ascontiguousarray(x_tr), y_tr, np.ascontiguousarray(x_te), y_te
    )


def _clock(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) for progress lines."""
    m, sec = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _about(seconds: float) -> str:
    """A rough duration for the up-front estimate: ``~20 s``, ``~1.7 min``."""
    return f"~{seconds:.0f} s" if seconds < 60 else f"~{seconds / 60:.1f} min"


_TIMED_BATCHES = 3  # the estimate is printed after this many batches (the first one, warm-up, is not counted)


def _train(
    model: DigitsResNet,
    data: DigitsData,
    *,
    epochs: int,
    seed: int,
    log: Callable[[str], None] | None = None,
    what: str = "the digits CNN",
    where: str = "",
) -> None:
    """Train in place. With ``log``, an estimate after the first batches and one line per epoch.

    Progress only reads clocks and losses: the weights are the same with or without it.
    """
    start = time.perf_counter()  # before the optimizer: building the first one imports much of torch (seconds)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    per_epoch = (len(x) + 63) // 64
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    model.train()
    first_done = 0.0  # time at the end of the first (warm-up) batch
    step = 0
    width = len(str(epochs))
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        loss_sum, seen = 0.0, 0
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            xb = x[idx]
            # light augmentation: random shifts of up to 2 pixels
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if log is None:
                continue
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
            if step == 1:
                first_done = time.perf_counter()
            if step == min(_TIMED_BATCHES, steps):
                now = time.perf_counter()
                per_step = (now - first_done) / (step - 1) if step > 1 else now - start
                total = (now - start) + per_step * (steps - step)
                log(f"[autosearch] training {what}: {epochs} epochs, {_about(total)} on this machine{where}")
        if log is not None:
            elapsed = time.perf_counter() - start
            left = elapsed / step * (steps - step)
            log(
                f"[autosearch]   epoch {epoch + 1:>{width}}/{epochs}  train loss {loss_sum / max(seen, 1):.4f}"
                f"  elapsed {_clock(elapsed)}  left ~{_clock(left)}"
            )
    model.eval()


def _cache_path(widths: tuple[int, ...], epochs: int, seed: int) -> Path:
    """Where the weights of one (widths, epochs, seed) are cached; the key formula is fixed (v1)."""
    key = hashlib.sha256(f"digits-resnet-v1-{tuple(widths)}-{epochs}-{seed}".encode()).hexdigest()[:12]
    return cache_dir() / f"digits_resnet_{key}.pt"


def pretrained_digits_cnn(
    *, epochs: int = _EPOCHS, seed: int = _SEED, widths: tuple[int, int, int] = _WIDTHS, verbose: bool = True
) -> DigitsResNet:
    """The trained default model, trained on first use and cached.

    Args:
        epochs: Training epochs (part of the cache key).
        seed: Seed for initialisation and batching (part of the cache key).
        widths: Channel widths of the three stages (part of the cache key; small ones train in seconds).
        verbose: When it trains, print an estimate of the training time after the first batches, one line
            per epoch (train loss, elapsed, time left) and the test accuracy at the end; silent when False.

    Returns:
        The model in eval mode.
    """
    path = _cache_path(tuple(widths), epochs, seed)
    torch.manual_seed(seed)
    model = DigitsResNet(widths=tuple(widths))  # type: ignore[arg-type]
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    data = load_digits_data(seed=seed)
    default = tuple(widths) == _WIDTHS and epochs == _EPOCHS and seed == _SEED
    what = "the default digits CNN" if default else f"the digits CNN (widths {'/'.join(map(str, widths))}, seed {seed})"
    start = time.perf_counter()
    _train(
        model, data, epochs=epochs, seed=seed, log=_print if verbose else None,
        what=what, where=f" (cached at {path})",
    )
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    if verbose:
        with torch.no_grad():
            acc = (model(torch.from_numpy(data.x_test)).argmax(1).numpy() == data.y_test).mean()
        print(f"[autosearch] trained in {_clock(time.perf_counter() - start)}: test accuracy {acc:.4f}", flush=True)
    return model


def _print(line: str) -> None:
    print(line, flush=True)
