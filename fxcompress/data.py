"""Data sets for `fxcompress train`: embedded digits, or real sets read from disk.

`load_data(spec)` understands:

- ``digits``: scikit-learn's 1797 real 8x8 handwritten digits, shipped inside
  scikit-learn, so the main job runs on a fresh machine with no download.
  The train/test split is fixed (stratified, 1437/360) and depends only on
  `seed` of `load_data`, never on the training seed, so runs with different
  training seeds are compared on the same test images.
- ``cifar10:PATH``, ``cifar100:PATH``: the "python version" pickles
  (PATH/cifar-10-batches-py/... or PATH pointing at that folder itself).
- ``mnist:PATH``: the raw idx files (PATH/MNIST/raw/..., or PATH itself).

The disk sets are read through torchvision with ``download=False``: fxcompress
never downloads. A missing file is a BadInput that names every expected file.

`upscale` is the output side length in pixels (16 turns 8x8 digits into
16x16); images are resized by nearest (integer factors, keeps the strokes
crisp) or bilinear interpolation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100, MNIST

from .errors import BadInput, closest

DIGITS_TEST_SIZE = 360
UPSCALE_MODES = ("nearest", "bilinear")
# Precompute the whole preprocessed set when it is this small: per-item work in
# __getitem__ is then a single index, which matters on a 2-core machine.
_MATERIALISE_BYTES = 256 * 2**20


@dataclass
class DataBundle:
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    name: str
    classes: List[str] = field(default_factory=list)
    mean: Tuple[float, ...] = ()
    std: Tuple[float, ...] = ()

    def example_batch(self, n: int = 2) -> torch.Tensor:
        """A batch of real images (example inputs for compile()).

        From the test split, which is never augmented: taking them draws no
        random numbers, so it cannot shift a seeded run.
        """
        return torch.stack([self.test[i][0] for i in range(min(n, len(self.test)))])

    def describe(self) -> dict:
        return {"name": self.name, "train": len(self.train), "test": len(self.test),
                "num_classes": self.num_classes, "in_channels": self.in_channels,
                "image_size": self.image_size}


class ImageSet(Dataset):
    """(image float CxHxW, int label) pairs, normalised, resized, optionally augmented.

    `images` is NCHW, uint8 (scale 255) or float in [0, scale]. Augmentation
    draws from torch's global generator, so a seeded run (and a resumed one
    that restores that generator) sees the same crops and flips.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, scale: float,
                 mean: Sequence[float], std: Sequence[float], size: int,
                 mode: str = "nearest", augment: Optional[str] = None, channels: Optional[int] = None):
        if images.dim() != 4:
            raise ValueError(f"images must be NCHW, got shape {tuple(images.shape)}")
        self.labels = labels.long()
        self.size = int(size)
        self.mode = mode
        self.augment = augment
        # The training loop gives augmentation its own generator, reseeded per
        # epoch, so that a compressed run and its baseline crop alike even when
        # a method draws random numbers (stochastic rounding) in between.
        self.generator: Optional[torch.Generator] = None
        self.channels = channels or images.shape[1]
        self._scale = float(scale)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        n, c = images.shape[:2]
        if n * c * self.size * self.size * 4 <= _MATERIALISE_BYTES:
            self.images = self._prepare(images)
            self._ready = True
        else:
            self.images = images
            self._ready = False

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        batched = x.dim() == 4
        x = x if batched else x.unsqueeze(0)
        x = (x.float() / self._scale - self._mean) / self._std
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            kw = {"align_corners": False} if self.mode == "bilinear" else {}
            x = F.interpolate(x, size=(self.size, self.size), mode=self.mode, **kw)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1).contiguous()  # grey to RGB for 3-channel models
        return x if batched else x[0]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int):
        x = self.images[i] if self._ready else self._prepare(self.images[i])
        if self.augment:
            x = _augment(x, self.augment, self.generator)
        return x, int(self.labels[i])


def _augment(x: torch.Tensor, kind: str, gen: Optional[torch.Generator] = None) -> torch.Tensor:
    # The seeds' CIFAR recipe: pad 4 (scaled to the image), random crop, and
    # a horizontal flip except for digits, where a flip changes the class.
    pad = max(1, x.shape[-1] // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
    x = padded[:, dy:dy + x.shape[-2], dx:dx + x.shape[-1]]
    if kind == "crop_flip" and bool(torch.rand((), generator=gen) < 0.5):
        x = x.flip(-1)
    return x.contiguous()


# --- spec parsing ------------------------------------------------------------

KINDS = ("digits", "cifar10", "cifar100", "mnist")


def parse_spec(spec: str) -> Tuple[str, Optional[str]]:
    if not isinstance(spec, str) or not spec:
        raise BadInput(f"--data must be one of digits, cifar10:PATH, cifar100:PATH, mnist:PATH; got {spec!r}")
    kind, _, path = spec.partition(":")
    kind = kind.lower()
    if kind not in KINDS:
        hint = closest(kind, KINDS)
        raise BadInput(f"unknown data set '{kind}' in --data {spec!r}; one of digits, cifar10:PATH, "
                       f"cifar100:PATH, mnist:PATH" + (f" (did you mean '{hint}'?)" if hint else ""))
    if kind == "digits":
        if path:
            raise BadInput(f"--data digits takes no path (the data ships with scikit-learn), got {spec!r}")
        return kind, None
    if not path:
        raise BadInput(f"--data {kind} needs the folder that holds it: {kind}:PATH (fxcompress never downloads)")
    return kind, os.path.expanduser(path)


def _check_upscale(upscale, native: int) -> int:
    if upscale is None:
        return native
    text = str(upscale).strip()
    if isinstance(upscale, bool) or not text.isdigit():
        raise BadInput(f"--upscale must be an image side length in whole pixels, e.g. 16; got {upscale!r}")
    size = int(text)
    if size < native or size > 512:
        raise BadInput(f"--upscale {size}: must be between the native size {native} and 512 pixels")
    return size


def load_data(spec: str = "digits", upscale: Optional[int] = None, seed: int = 0,
              upscale_mode: Optional[str] = None, augment: Optional[bool] = None,
              channels: Optional[int] = None) -> DataBundle:
    """Load a data set by spec; see the module docstring.

    `seed` picks the digits train/test split only (0 is the split every
    benchmark uses). `upscale_mode` defaults to nearest for integer factors and
    bilinear otherwise. `augment` (random crop, plus flips for CIFAR) defaults
    to on for CIFAR and off for digits and MNIST. `channels=3` repeats grey
    images into three channels, for models built for RGB (torchvision's).
    """
    kind, path = parse_spec(spec)
    if upscale_mode is not None and upscale_mode not in UPSCALE_MODES:
        raise BadInput(f"upscale mode must be one of {', '.join(UPSCALE_MODES)}, got {upscale_mode!r}")
    if kind == "digits":
        bundle = _digits(upscale, seed, upscale_mode, bool(augment))
    elif kind == "mnist":
        bundle = _mnist(path, upscale, upscale_mode, bool(augment))
    else:
        bundle = _cifar(kind, path, upscale, upscale_mode, True if augment is None else bool(augment))
    return _with_channels(bundle, channels)


def _with_channels(bundle: DataBundle, channels: Optional[int]) -> DataBundle:
    if channels is None or channels == bundle.in_channels:
        return bundle
    if bundle.in_channels != 1:
        raise BadInput(f"cannot turn {bundle.in_channels}-channel {bundle.name} images into {channels} channels")
    for ds in (bundle.train, bundle.test):
        ds.channels = channels
        if ds._ready:
            ds.images = ds.images.expand(-1, channels, -1, -1).contiguous()
    bundle.in_channels = channels
    bundle.mean, bundle.std = bundle.mean * channels, bundle.std * channels
    return bundle


def _mode_for(native: int, size: int, mode: Optional[str]) -> str:
    if mode:
        return mode
    return "nearest" if size % native == 0 else "bilinear"


def _channel_stats(images: torch.Tensor, scale: float) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    # Chunked float64 sums: converting all of CIFAR to float at once costs 600 MB.
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64) / scale
        s += x.sum(dim=(0, 2, 3))
        s2 += (x * x).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _digits(upscale, seed: int, mode: Optional[str], augment: bool) -> DataBundle:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise BadInput("--data digits needs scikit-learn: pip install 'fxcompress[data]'") from None
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32)).unsqueeze(1)  # N,1,8,8, values 0..16
    y = torch.from_numpy(d.target.astype(np.int64))
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_SIZE,
                                           stratify=d.target, random_state=int(seed))
    idx_train, idx_test = torch.from_numpy(np.sort(idx_train)), torch.from_numpy(np.sort(idx_test))
    size = _check_upscale(upscale, 8)
    mode = _mode_for(8, size, mode)
    mean, std = _channel_stats(x[idx_train], 16.0)
    aug = "crop" if augment else None
    train = ImageSet(x[idx_train], y[idx_train], 16.0, mean, std, size, mode, aug)
    test = ImageSet(x[idx_test], y[idx_test], 16.0, mean, std, size, mode, None)
    return DataBundle(train, test, 10, 1, size, "digits", [str(i) for i in range(10)], mean, std)


# --- disk data sets through torchvision ---------------------------------------

def _cifar_layout(kind: str):
    base = CIFAR10 if kind == "cifar10" else CIFAR100

    # torchvision checks the md5 of the full official files; we only require
    # that they exist and parse, so re-packed copies and small fixtures load
    # too (a damaged file still fails, in the pickle load, as a BadInput).
    class _Cifar(base):
        train_list = [(f, None) for f, _ in base.train_list]
        test_list = [(f, None) for f, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    files = [f for f, _ in base.train_list + base.test_list] + [base.meta["filename"]]
    return _Cifar, base.base_folder, files


def _find_root(path: str, folder: str, files: List[str], spec: str) -> str:
    """The root torchvision wants: the parent of `folder`; PATH may be either."""
    if not os.path.isdir(path):
        raise BadInput(f"--data {spec}: folder not found: {path}")
    candidates = [(path, os.path.join(path, folder))]
    if os.path.basename(os.path.normpath(path)) == folder:
        candidates.insert(0, (os.path.dirname(os.path.normpath(path)), os.path.normpath(path)))
    for root, inner in candidates:
        if all(os.path.isfile(os.path.join(inner, f)) for f in files):
            return root
    root, inner = candidates[0]  # report against the layout the user most likely meant
    missing = [os.path.join(inner, f) for f in files if not os.path.isfile(os.path.join(inner, f))]
    raise BadInput(f"--data {spec}: missing {len(missing)} of {len(files)} files: {', '.join(missing)} "
                   f"(expected the files under {inner}; fxcompress never downloads)")


def _cifar(kind: str, path: str, upscale, mode, augment: bool) -> DataBundle:
    spec = f"{kind}:{path}"
    cls, folder, files = _cifar_layout(kind)
    root = _find_root(path, folder, files, spec)
    try:
        tr = cls(root, train=True, download=False)
        te = cls(root, train=False, download=False)
    except Exception as e:  # a truncated or foreign pickle
        raise BadInput(f"--data {spec}: cannot read {os.path.join(root, folder)}: {type(e).__name__}: {e}") from None
    xtr = torch.from_numpy(np.ascontiguousarray(tr.data.transpose(0, 3, 1, 2)))
    xte = torch.from_numpy(np.ascontiguousarray(te.data.transpose(0, 3, 1, 2)))
    ytr, yte = torch.tensor(tr.targets), torch.tensor(te.targets)
    num_classes = len(tr.classes)
    _check_labels(spec, [ytr, yte], num_classes)
    size = _check_upscale(upscale, 32)
    mode = _mode_for(32, size, mode)
    mean, std = _channel_stats(xtr, 255.0)
    train = ImageSet(xtr, ytr, 255.0, mean, std, size, mode, "crop_flip" if augment else None)
    test = ImageSet(xte, yte, 255.0, mean, std, size, mode, None)
    return DataBundle(train, test, num_classes, 3, size, kind, list(tr.classes), mean, std)


MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _mnist(path: str, upscale, mode, augment: bool) -> DataBundle:
    spec = f"mnist:{path}"
    if not os.path.isdir(path):
        raise BadInput(f"--data {spec}: folder not found: {path}")
    # Accept PATH, PATH/MNIST/raw (torchvision's layout) or PATH/raw.
    options = [os.path.join(path, "MNIST", "raw"), os.path.join(path, "raw"), path]
    raw = next((d for d in options if all(os.path.isfile(os.path.join(d, f)) for f in MNIST_FILES)), None)
    if raw is None:
        inner = options[0]
        missing = [os.path.join(inner, f) for f in MNIST_FILES]
        raise BadInput(f"--data {spec}: missing the MNIST idx files: {', '.join(missing)} (uncompressed; "
                       f"they may also sit directly in {path}; fxcompress never downloads)")

    class _Mnist(MNIST):
        @property
        def raw_folder(self) -> str:
            return raw

    try:
        tr = _Mnist(path, train=True, download=False)
        te = _Mnist(path, train=False, download=False)
    except Exception as e:
        raise BadInput(f"--data {spec}: cannot read the idx files in {raw}: {type(e).__name__}: {e}") from None
    xtr, xte = tr.data.unsqueeze(1).contiguous(), te.data.unsqueeze(1).contiguous()
    ytr, yte = tr.targets.long(), te.targets.long()
    _check_labels(spec, [ytr, yte], 10)
    size = _check_upscale(upscale, xtr.shape[-1])
    mode = _mode_for(xtr.shape[-1], size, mode)
    mean, std = _channel_stats(xtr, 255.0)
    train = ImageSet(xtr, ytr, 255.0, mean, std, size, mode, "crop" if augment else None)
    test = ImageSet(xte, yte, 255.0, mean, std, size, mode, None)
    return DataBundle(train, test, 10, 1, size, "mnist", [str(i) for i in range(10)], mean, std)


def _check_labels(spec: str, labels: List[torch.Tensor], num_classes: int) -> None:
    for y in labels:
        if y.numel() == 0:
            raise BadInput(f"--data {spec}: a split has no images")
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise BadInput(f"--data {spec}: labels must lie in 0..{num_classes - 1}, "
                           f"found {int(y.min())}..{int(y.max())}")
