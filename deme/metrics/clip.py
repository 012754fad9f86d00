"""CLIP score (docs/paper.md §1.9, §8.3) through open_clip, from local files only.

Per image: ``100 * cos(image embedding, prompt embedding)`` with both embeddings L2-normalised, the image
through the model's own preprocess (the transform ``open_clip.create_model_and_transforms`` returns, on PIL
images) and the prompt through the model's own tokenizer (``open_clip.get_tokenizer``), in fp32.

Where the model comes from (:func:`load_clip`), always through
``open_clip.create_model_and_transforms(name, pretrained=<weights file>)``, the function that loads ViT-g-14:

- ``clip.train`` (tiny_t2i): the clip stage trains a small open_clip ``CLIP`` (ViT image tower, the CLIP
  text transformer with the real BPE vocabulary) contrastively on the profile's captions
  (:func:`train_clip`) and saves it in the open_clip Hugging Face hub layout (:func:`save_clip`:
  ``open_clip_config.json`` + ``open_clip_model.safetensors``); its architecture is registered with open_clip
  under ``clip.model`` (:func:`register_model_config`).
- ``clip.local_path``: a weights file, or a folder in the hub layout (e.g. a ``hf download --local-dir``).
- otherwise the cache: open_clip's pretrained registry names the hub repository and file of
  ``(clip.model, clip.pretrained)`` (ViT-g-14 / laion2b_s34b_b88k -> laion/CLIP-ViT-g-14-laion2B-s34B-b88K,
  open_clip_pytorch_model.bin or its .safetensors twin), looked up offline in ``clip.cache_dir`` and the
  default Hugging Face cache (:func:`find_cached_weights`). Nothing is ever downloaded: a missing file raises
  :class:`ClipMissing` naming the model, every place looked in and the command that fetches it.

Weights load through open_clip's own loader: safetensors, or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from deme.io import atomic_dir, atomic_write_text, derive_seed, sha256_file

VOCAB_SIZE = 49408  # the CLIP BPE vocabulary open_clip ships
CONFIG_NAME = "open_clip_config.json"  # open_clip.constants.HF_CONFIG_NAME
WEIGHTS_NAME = "open_clip_model.safetensors"  # open_clip.constants.HF_SAFE_WEIGHTS_NAME
HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"  # open_clip.constants.HF_WEIGHTS_NAME (registry default)
RECORD_NAME = "clip.json"  # what the clip stage writes for a real profile: the resolved weights
# weight file names open_clip looks for in a folder (factory._find_checkpoint_in_dir), in its order
_FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                   "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                   "model.pth")
_PREPROCESS_ARGS = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
                    "resize_mode": "image_resize_mode"}


class ClipMissing(FileNotFoundError):
    """No local copy of the CLIP weights (nothing is downloaded at run time)."""


# ----------------------------------------------------------------------------------------------------
# The small model's architecture, registered with open_clip
# ----------------------------------------------------------------------------------------------------

def clip_model_config(cfg) -> dict:
    """The open_clip model config (``model_cfg``) of the small CLIP described by ``cfg.clip``."""
    c, res = cfg.clip, cfg.data.resolution
    if res % c.patch_size:
        raise ValueError(f"clip.patch_size={c.patch_size} must divide data.resolution={res}")
    return {"embed_dim": c.embed_dim,
            "vision_cfg": {"image_size": res, "patch_size": c.patch_size, "width": c.width, "layers": c.layers,
                           "head_width": c.width // c.heads},
            "text_cfg": {"context_length": c.context_length, "vocab_size": VOCAB_SIZE, "width": c.width,
                         "heads": c.heads, "layers": c.layers}}


def _builtin(name: str) -> bool:
    import open_clip

    return (Path(open_clip.__file__).parent / "model_configs" / f"{name}.json").is_file()


def register_model_config(name: str, model_cfg: dict) -> None:
    """Make ``name`` an open_clip model (``open_clip.add_model_config``), so that
    ``create_model_and_transforms(name, ...)`` and ``get_tokenizer(name)`` know it. The config file lives in
    a content-addressed folder under the temp dir; registering another config under the same name replaces it."""
    import open_clip

    model_cfg = json.loads(json.dumps(model_cfg))  # JSON types, as open_clip reads them back
    if open_clip.get_model_config(name) == model_cfg:
        return
    if _builtin(name):
        raise ValueError(f"clip.model={name!r} is an open_clip built-in architecture; "
                         "give the small CLIP model another name (e.g. deme-tiny-clip)")
    if "/" in name or name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"clip.model={name!r}: a small CLIP model's name must be a plain name")
    text = json.dumps(model_cfg, indent=2, sort_keys=True) + "\n"
    folder = Path(tempfile.gettempdir()) / "deme-open-clip" / hashlib.sha256(text.encode()).hexdigest()[:16]
    path = folder / f"{name}.json"
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    open_clip.add_model_config(path)  # appended last, so it wins over earlier registrations of the name
    if open_clip.get_model_config(name) != model_cfg:
        raise RuntimeError(f"open_clip did not register the model config {path}")


# ----------------------------------------------------------------------------------------------------
# Training (tiny_t2i)
# ----------------------------------------------------------------------------------------------------

def _normalise(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 [n, 3, H, W] at the model's image size -> the model's input: what its preprocess does to such an
    image (resize and crop are the identity at that size; ToTensor, Normalize(mean, std)), as tensor ops."""
    pp = model.visual.preprocess_cfg
    mean = torch.tensor(pp["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pp["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def f(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - mean.to(x.device)) / std.to(x.device)
    return f


@contextlib.contextmanager
def _quiet():
    """Silence open_clip's root-logger warnings for the duration of the block."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def train_clip(images: np.ndarray, captions: Sequence[str], cfg, seed: int, device: torch.device | str = "cpu",
               log: Callable[[dict, int], None] | None = None):
    """Train the small open_clip model of ``cfg.clip`` on uint8 [n, H, W, 3] images and their captions.

    Symmetric InfoNCE (image->text and text->image cross-entropy over the batch) with CLIP's learnable
    temperature (``logit_scale``, initialised at log(1/0.07), clamped at log(100)). Several images of a batch
    can share a caption (the shapes have 480 distinct captions), so the targets spread evenly over every
    pair with the same caption instead of calling those pairs negatives. AdamW with weight decay on the
    matrices, linear warm-up over the first 5% of the iterations then cosine decay. Seeded: the same seed
    gives the same model on the CPU. Returns the model in eval mode (on ``device``).
    """
    import open_clip

    c = cfg.clip
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [n, H, W, 3], got {images.dtype} {images.shape}")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if images.shape[1:3] != (cfg.data.resolution,) * 2:
        raise ValueError(f"images are {images.shape[1]}x{images.shape[2]}, data.resolution is {cfg.data.resolution}")
    device = torch.device(device)
    model_cfg = clip_model_config(cfg)
    register_model_config(c.model, model_cfg)
    torch.manual_seed(derive_seed(seed, "clip", "init"))
    with _quiet():  # open_clip warns that no pretrained weights were loaded: training from scratch is the point
        model = open_clip.create_model(c.model, pretrained=None, precision="fp32", device=device)
    model.train()
    normalise = _normalise(model)
    tokenizer = open_clip.get_tokenizer(c.model)

    unique, caption_id = np.unique(np.asarray(captions, dtype=np.str_), return_inverse=True)
    tokens = tokenizer([str(u) for u in unique]).to(device)  # [distinct captions, context]
    caption_id = torch.as_tensor(caption_id.reshape(-1), dtype=torch.long, device=device)
    x_all = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous().to(device)  # a copy: uint8, small

    # Only the vocabulary rows of tokens in the captions can get a gradient (a few dozen of 49,408): train a
    # compact copy of those rows (token ids renumbered in the same order, so the end-of-text token stays the
    # largest id, as the argmax pooling needs) and write them back at the end. Same result as training the
    # full table (no weight decay on embeddings: AdamW never moves a row that never had a gradient), without
    # a dense 49,408 x width gradient and optimizer update at every step.
    full_embedding, used = model.token_embedding, None
    if getattr(model, "text_pool_type", "argmax") == "argmax":
        used = torch.unique(tokens)  # sorted
        remap = torch.zeros(VOCAB_SIZE, dtype=torch.long, device=device)
        remap[used] = torch.arange(len(used), device=device)
        tokens = remap[tokens]
        model.token_embedding = torch.nn.Embedding.from_pretrained(full_embedding.weight.detach()[used].clone(),
                                                                   freeze=False)
    try:
        _fit(model, x_all, tokens, caption_id, c, seed, log, normalise)
    finally:
        if used is not None:
            with torch.no_grad():
                full_embedding.weight[used] = model.token_embedding.weight
            model.token_embedding = full_embedding
    return model.eval()


def _fit(model, x_all: torch.Tensor, tokens: torch.Tensor, caption_id: torch.Tensor, c, seed: int, log,
         normalise) -> None:
    """The optimisation loop of :func:`train_clip`."""
    from deme.train import lr_factor

    device = x_all.device
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=c.lr, betas=(0.9, 0.98), eps=1e-6, foreach=True)
    warmup = max(1, c.iterations // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, "cosine", warmup, c.iterations))

    g = torch.Generator().manual_seed(derive_seed(seed, "clip", "data"))
    n = len(x_all)
    batch = min(c.train_batch_size, n)
    bar = tqdm(range(c.iterations), desc="clip", dynamic_ncols=True)
    for step in bar:
        idx = torch.randperm(n, generator=g)[:batch].to(device)  # distinct images per batch
        cid = caption_id[idx]
        img = F.normalize(model.encode_image(normalise(x_all[idx])), dim=-1)
        txt = F.normalize(model.encode_text(tokens[cid]), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        same = (cid[:, None] == cid[None, :]).float()
        target = same / same.sum(1, keepdim=True)  # symmetric `same`: the same targets both ways
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        if not torch.isfinite(loss):
            from deme.train import NonFiniteLossError

            raise NonFiniteLossError(f"clip: non-finite contrastive loss at step {step + 1}; lower clip.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % 50 == 0 or step + 1 == c.iterations:
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
            if log:
                log({"clip_loss": loss.item(), "clip_logit_scale": model.logit_scale.exp().item()}, step + 1)


def save_clip(model, model_cfg: dict, out_dir: str | Path) -> None:
    """Write ``out_dir`` in the open_clip hub layout, atomically: ``open_clip_config.json``
    (``{"model_cfg", "preprocess_cfg"}``) and ``open_clip_model.safetensors``."""
    from safetensors.torch import save_file

    preprocess = dict(model.visual.preprocess_cfg)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(out_dir) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess},
                                                  indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS_NAME))


# ----------------------------------------------------------------------------------------------------
# Finding the weights, offline
# ----------------------------------------------------------------------------------------------------

def hf_cache_dir() -> str:
    """The default Hugging Face hub cache (HF_HUB_CACHE / HF_HOME, as huggingface_hub resolved them)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hub_names(filename: str) -> list[str]:
    """The file names open_clip tries for a registry entry, in its order (safetensors twin first)."""
    if filename == HF_WEIGHTS_NAME:
        return [WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def find_cached_weights(model: str, tag: str, cache_dir: str = "") -> tuple[Path, dict]:
    """The local weights file of open_clip's pretrained ``(model, tag)`` and the tag's registry entry.

    Looks in ``cache_dir`` (a Hugging Face hub cache, as ``hf download --cache-dir`` fills it) and the
    default Hugging Face cache, with ``huggingface_hub.try_to_load_from_cache`` (no network); for registry
    entries that are plain URLs (OpenAI's), in ``cache_dir`` and ``~/.cache/clip`` as open_clip saves them.
    """
    import open_clip

    if not tag:
        raise ValueError(f"clip.pretrained is empty: name an open_clip pretrained tag of {model!r} "
                         "or set clip.local_path")
    pcfg = open_clip.get_pretrained_cfg(model, tag)
    if not pcfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise ValueError(f"open_clip has no pretrained weights {model!r} / {tag!r} (known tags of {model!r}: "
                         f"{known}); fix clip.model / clip.pretrained or set clip.local_path")
    looked: list[str] = []
    if pcfg.get("file"):
        p = Path(pcfg["file"])
        if p.is_file():
            return p, pcfg
        looked.append(str(p))
    caches = list(dict.fromkeys([d for d in (cache_dir, hf_cache_dir()) if d]))
    fetch = ""
    if pcfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        # open_clip's convention: "org/name/file" or "org/name/" for its default file (download_pretrained)
        repo, filename = os.path.split(pcfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        names = _hub_names(filename)
        for cache in caches:
            for name in names:
                hit = try_to_load_from_cache(repo, name, cache_dir=cache)
                if isinstance(hit, str) and Path(hit).is_file():
                    return Path(hit), pcfg
            looked.append(f"{Path(cache) / ('models--' + repo.replace('/', '--'))} ({' or '.join(names)})")
        to = f" --cache-dir {cache_dir}" if cache_dir else ""
        fetch = (f"hf download {repo} {filename}{to} (with huggingface_hub < 1.0: huggingface-cli download "
                 f"{repo} {filename}{to})")
    if pcfg.get("url"):
        filename = os.path.basename(pcfg["url"])
        for d in list(dict.fromkeys([d for d in (cache_dir, os.path.expanduser("~/.cache/clip")) if d])):
            p = Path(d) / filename
            if p.is_file():
                return p, pcfg
            looked.append(str(p))
        if not fetch:
            fetch = f"curl -L {pcfg['url']} -o {Path(cache_dir or os.path.expanduser('~/.cache/clip')) / filename}"
    raise ClipMissing(f"CLIP weights of open_clip {model!r} pretrained={tag!r} not found (nothing is downloaded); "
                      f"looked in: {'; '.join(looked)}; on a connected machine run: {fetch}, then copy the "
                      "cache here (clip.cache_dir names a cache to look in), or set clip.local_path to the "
                      "downloaded file")


def _preprocess_args(pp: dict) -> dict:
    """create_model_and_transforms' image_* keyword arguments from a preprocess / registry dict."""
    out = {}
    for key, arg in _PREPROCESS_ARGS.items():
        if pp.get(key) is not None:
            out[arg] = tuple(pp[key]) if key in ("mean", "std") else pp[key]
    return out


def _resolve_folder(path: Path, name: str) -> tuple[Path, str, dict]:
    """A folder: the hub layout (config + weights), or one of open_clip's weight file names, or the record
    the clip stage writes for a real profile. Returns (weights, model name, preprocess dict)."""
    config = path / CONFIG_NAME
    record = path / RECORD_NAME
    weights = next((path / n for n in _FOLDER_WEIGHTS if (path / n).is_file()), None)
    if weights is None and record.is_file() and not config.is_file():
        info = json.loads(record.read_text())
        w = Path(info.get("weights", ""))
        if not w.is_file():
            raise ClipMissing(f"{record}: the CLIP weights it names ({w}) are gone; rerun: python stages/clip.py --t2i")
        return w, info.get("clip_model", name), info.get("preprocess_cfg", {})
    if weights is None:
        raise ClipMissing(f"{path}: no CLIP weights ({' / '.join(_FOLDER_WEIGHTS[:3])}); for the trained model "
                          "run: python stages/clip.py --t2i; for a real one: hf download <repo> --local-dir "
                          f"{path}")
    if not config.is_file():
        return weights, name, {}
    try:
        data = json.loads(config.read_text())
        model_cfg = data["model_cfg"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{config}: not an open_clip config ({type(e).__name__}: {e})") from None
    if not _builtin(name):
        register_model_config(name, model_cfg)
    return weights, name, data.get("preprocess_cfg", {})


def resolve_clip(cfg, path: str | Path | None = None) -> tuple[Path, str, str, dict]:
    """(weights file, open_clip model name, what `pretrained` was, preprocess dict) for ``cfg.clip``."""
    import open_clip

    c = cfg.clip
    if path is None and c.train:
        from deme.paths import Paths

        path = Paths(cfg.profile).clip
    if path is None and c.local_path:
        path = c.local_path
    if path is None:
        weights, pcfg = find_cached_weights(c.model, c.pretrained, c.cache_dir)
        if open_clip.get_model_config(c.model) is None:  # a small model of ours, published under a tag
            register_model_config(c.model, clip_model_config(cfg))
        return weights, c.model, c.pretrained, pcfg
    path = Path(path)
    if c.train and not (path / CONFIG_NAME).is_file() and not path.is_file():
        raise ClipMissing(f"{path}: the trained CLIP model is missing ({CONFIG_NAME}, {WEIGHTS_NAME}); "
                          "make it with: python stages/clip.py --t2i")
    if path.is_dir():
        weights, name, pp = _resolve_folder(path, c.model)
        return weights, name, str(path), pp
    if not path.is_file():
        raise ClipMissing(f"clip.local_path={path}: no such file or folder (a CLIP weights file, or a folder "
                          f"with {CONFIG_NAME} and the weights)")
    if open_clip.get_model_config(c.model) is None:  # a small model of ours, saved as a bare file
        register_model_config(c.model, clip_model_config(cfg))
    pcfg = open_clip.get_pretrained_cfg(c.model, c.pretrained) if c.pretrained else {}
    return path, c.model, str(path), pcfg


# ----------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------

_SHA: dict[tuple, str] = {}


def _sha256(path: Path) -> str:
    """sha256 of a file, cached by path, size and mtime (ViT-g-14's weights are ~5 GB)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        _SHA[key] = sha256_file(path)
    return _SHA[key]


class ClipScorer:
    """CLIP score of images against prompts with one open_clip model, its preprocess and its tokenizer."""

    def __init__(self, model, preprocess, tokenizer, *, name: str, pretrained: str, weights: Path | None,
                 batch_size: int = 64, device: torch.device | str = "cpu"):
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.name, self.pretrained, self.weights = name, pretrained, weights
        self.batch_size, self.device = int(batch_size), torch.device(device)

    @contextlib.contextmanager
    def _fp32(self):
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            yield

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 3, H, W] -> L2-normalised fp32 embeddings [n, d] (on the CPU)."""
        from PIL import Image

        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [n, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        out = []
        with self._fp32():
            for lo in range(0, len(images), self.batch_size):
                chunk = images[lo:lo + self.batch_size].permute(0, 2, 3, 1).cpu().numpy()
                x = torch.stack([self.preprocess(Image.fromarray(im)) for im in chunk]).to(self.device)
                out.append(F.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> L2-normalised fp32 embeddings [n, d] (on the CPU)."""
        prompts = [str(p) for p in prompts]
        out = []
        with self._fp32():
            for lo in range(0, len(prompts), self.batch_size):
                tokens = self.tokenizer(prompts[lo:lo + self.batch_size]).to(self.device)
                out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    @staticmethod
    def cosine_scores(image_features: torch.Tensor, text_features: torch.Tensor) -> np.ndarray:
        """100 x the row-wise cosine of (normalised) image and text embeddings."""
        return (100.0 * (image_features * text_features).sum(-1)).double().numpy()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> np.ndarray:
        """Per image: 100 x cos(image embedding, embedding of its prompt), docs/paper.md §8.3 (float64 [n])."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return self.cosine_scores(self.image_features(images), self.text_features(prompts))

    def describe(self) -> dict:
        return {"clip_model": self.name, "clip_pretrained": self.pretrained,
                "clip_sha256": _sha256(self.weights) if self.weights else ""}


def load_clip(cfg, device: torch.device | str = "cpu", path: str | Path | None = None) -> ClipScorer:
    """The profile's CLIP scorer (see the module docstring for where the weights come from).

    ``path`` overrides the location: a weights file or a folder (hub layout). Raises :class:`ClipMissing`
    when the weights are not on this machine, without touching the network.
    """
    import open_clip

    weights, name, pretrained, pp = resolve_clip(cfg, path)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=str(weights), precision="fp32", device=device, weights_only=True,
            **_preprocess_args(pp))
    except Exception as e:  # safetensors / unpickling / state-dict mismatch errors: a bad or wrong file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{weights}: not loadable as open_clip {name!r} weights ({msg[:300]})") from None
    return ClipScorer(model.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(name), name=name,
                      pretrained=pretrained, weights=Path(weights), batch_size=cfg.clip.batch_size, device=device)


def wrong_captions(captions: Sequence[str], seed: int) -> list[str]:
    """A seeded derangement: for each caption, another item's caption that differs from it."""
    captions = [str(c) for c in captions]
    if len(set(captions)) < 2:
        raise ValueError("need at least two different captions to pick wrong ones")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(captions))
    out = []
    for i, j in enumerate(perm):
        while captions[j] == captions[i]:
            j = int(rng.integers(len(captions)))
        out.append(captions[j])
    return out


def pair_scores(scorer: ClipScorer, images: torch.Tensor, captions: Sequence[str],
                wrong: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """CLIP scores of each image with its own caption and with a wrong one (image embeddings computed once)."""
    if not len(images) == len(captions) == len(wrong):
        raise ValueError(f"{len(images)} images, {len(captions)} captions, {len(wrong)} wrong captions")
    img = scorer.image_features(images)
    return (scorer.cosine_scores(img, scorer.text_features(captions)),
            scorer.cosine_scores(img, scorer.text_features(wrong)))


def ranking_accuracy(scorer: ClipScorer, images: torch.Tensor, captions: Sequence[str],
                     wrong_captions: Sequence[str]) -> float:
    """Fraction of images whose own caption scores strictly above the wrong one."""
    matched, mismatched = pair_scores(scorer, images, captions, wrong_captions)
    return float(np.mean(matched > mismatched))


def images_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, H, W, 3] (the datasets' layout) -> uint8 torch [n, 3, H, W] (the scorer's input)."""
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)  # a copy (datasets are read-only memmaps)


__all__ = ["ClipMissing", "ClipScorer", "clip_model_config", "register_model_config", "train_clip",
                      "save_clip", "find_cached_weights", "resolve_clip", "load_clip", "wrong_captions",
                      "pair_scores", "ranking_accuracy", "images_nchw", "hf_cache_dir"]
