"""The first stage of every pipeline: the whole parameters file checked before DVC touches any output.

DVC removes a stage's outputs just before it runs the stage's command, so a bad value that only the stage
itself rejects would cost the outputs of the previous good run. Every stage of dvc.yaml (and of
sweeps/dvc.yaml, checkpoints/dvc.yaml) therefore depends on :data:`MARKER`, the output of the `validate`
stage, which depends on all of params.yaml: a changed params file runs `validate` first, and a bad value
stops `dvc repro` there with one line naming the key, before any other stage runs. The marker's content
never changes, so a valid change reruns only the stages that read the changed keys.

Under ``dvc exp run -S`` (DVC sets ``DVC_EXP_BASELINE_REV``) the rejected keys are also put back to their
values in the experiment's baseline commit, every other line kept (uncommitted edits of other keys stay),
and the rejected version is kept in ``.dvc/tmp/params.rejected.yaml``: a failed experiment leaves the
workspace as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from deme import memory
from deme.codedeps import MARKER
from deme.config import Config, ConfigError, config_from_mapping, read_params

MARKER_TEXT = "params.yaml passed validation (deme/validation.py); this file never changes\n"
REJECTED = Path(".dvc/tmp/params.rejected.yaml")


def check(path: str | Path = "params.yaml") -> None:
    """Validate both pipelines' sections of ``path`` exactly as the stages load them, and every value that
    sizes memory against this machine (deme/memory.py); ConfigError if not."""
    raw = read_params(path)
    check_memory(config_from_mapping(raw))
    if "t2i" in raw:
        check_memory(config_from_mapping(raw, "t2i"))


# ---------------------------------------------------------------------------------------------- memory
# The batches through the UNet, measured (deme/memory.py has the budget and the arithmetic bounds).


def _unet_and_inputs(cfg: Config, batch: int) -> tuple[Callable, Callable]:
    """Builders of the profile's UNet and of one batch of its inputs (to be called under FakeTensorMode)."""
    import torch

    if cfg.task == "t2i":
        from deme.text2image import build_cond_unet

        size = cfg.data.resolution // cfg.pipeline.vae.factor
        ch, ctx = cfg.pipeline.vae.latent_channels, cfg.pipeline.unet.cross_attention_dim
        return (lambda: build_cond_unet(cfg, size),
                lambda b: (torch.randn(b, ch, size, size), torch.randint(0, 1000, (b,)),
                           {"encoder_hidden_states": torch.randn(b, cfg.pipeline.text_encoder.max_length, ctx)}))
    from deme.models import build_unet

    r = cfg.data.resolution
    return lambda: build_unet(cfg), lambda b: (torch.randn(b, 3, r, r), torch.randint(0, 1000, (b,)), {})


def _fake_peak(cfg: Config, batch: int, train: bool) -> tuple[int, int]:
    """(peak bytes of one forward (+ backward) of ``batch`` through the UNet, its parameter bytes), measured
    on fake tensors."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    build, inputs = _unet_and_inputs(cfg, batch)
    with FakeTensorMode():
        unet = build()
        params = sum(p.numel() * p.element_size() for p in unet.parameters())
        x, t, kw = inputs(batch)
        tracker = MemTracker()
        tracker.track_external(unet)
        with tracker:
            if train:
                unet(x, t, **kw).sample.square().mean().backward()
            else:
                with torch.no_grad():
                    unet(x, t, **kw)
        peak = sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())
    return int(peak), int(params)


def peaks_file() -> Path:
    return Path(os.environ.get("DEME_CACHE") or Path.home() / ".cache" / "deme-suite") / "unet-peaks.json"


def unet_peak(cfg: Config, batch: int, train: bool) -> tuple[int, int]:
    """:func:`_fake_peak`, measured once per architecture, batch, mode and torch version on this machine (a few
    seconds each; kept in ``$DEME_CACHE/unet-peaks.json``, default ~/.cache/deme-suite)."""
    import torch

    key = repr((torch.__version__, cfg.task, cfg.data.resolution, cfg.model.unet, cfg.pipeline, batch, train))
    key = hashlib.sha256(key.encode()).hexdigest()[:24]
    peaks = peaks_file()
    try:
        known = json.loads(peaks.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known.get(key), list):
        known[key] = list(_fake_peak(cfg, batch, train))
        try:
            peaks.parent.mkdir(parents=True, exist_ok=True)
            tmp = peaks.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            tmp.replace(peaks)
        except OSError:
            pass  # a read-only home: measure again next time
    return int(known[key][0]), int(known[key][1])


def training_bytes(cfg: Config, batch: int) -> int:
    """One training step: forward + backward, the AdamW moments (2 P), the EMA copy (P) and the frozen teacher
    of the consistency loss (P and its forward)."""
    peak, params = unet_peak(cfg, batch, train=True)
    teacher, _ = unet_peak(cfg, batch, train=False)
    return peak + 3 * params + teacher


def sampling_bytes(cfg: Config, batch: int) -> int:
    """One sampling call: the forward of the (guidance-doubled) batch with the ensemble's N models resident."""
    guided = cfg.task == "t2i" and cfg.pipeline.guidance_scale != 1.0
    peak, params = unet_peak(cfg, batch * (2 if guided else 1), train=False)
    return peak + (cfg.deme.n - 1) * params


def check_batches(cfg: Config, avail: tuple[str, int] | None = None) -> None:
    """Every batch through the UNet, against the device the stages run on (runtime.device)."""
    avail = avail or memory.budget(cfg.runtime.device)
    p = "t2i." if cfg.task == "t2i" else ""
    how = " (fp32, the UNet measured on fake tensors)"
    keys = [("finetune.batch_size", cfg.finetune.batch_size)]
    if cfg.model.source == "train":  # the pretrain stage trains it; a hub profile imports its checkpoint
        keys.insert(0, ("pretrain.batch_size", cfg.pretrain.batch_size))
    for key, b in keys:
        memory.refuse(p + key, training_bytes(cfg, b), f"a training step on {b} images", avail, how)
    b = cfg.sample.batch_size
    memory.refuse(f"{p}sample.batch_size", sampling_bytes(cfg, b),
                  f"sampling {b} images per batch with {cfg.deme.n} models resident", avail, how)


def check_memory(cfg: Config, avail: tuple[str, int] | None = None) -> None:
    """Every value that sizes memory (deme/memory.py); ConfigError naming the first that does not fit."""
    memory.check_counts(cfg)
    try:
        check_batches(cfg, avail)
    except ConfigError:
        raise
    except Exception as e:  # the estimate itself failed (an architecture fake tensors cannot run): not a verdict
        import sys

        print(f"warning: memory check of the {cfg.profile} profile skipped: {type(e).__name__}: {e}"[:300],
              file=sys.stderr)


def _set(doc, keys: list[str], base) -> bool:
    """Set ``doc[keys]`` to the baseline's value (``base`` the baseline mapping), or drop it (and the
    sections left empty that the baseline lacks); False if neither file has the key."""
    chain = [(doc, base)]
    for k in keys[:-1]:
        node, b = chain[-1]
        if not isinstance(node, dict) or k not in node:
            return False
        chain.append((node[k], b.get(k, _MISSING) if isinstance(b, dict) else _MISSING))
    node, b = chain[-1]
    if not isinstance(node, dict):
        return False
    if isinstance(b, dict) and keys[-1] in b:
        node[keys[-1]] = b[keys[-1]]
        return True
    if node.pop(keys[-1], _MISSING) is _MISSING:
        return False
    for i in range(len(chain) - 1, 0, -1):  # sections that -S created and that are now empty
        if chain[i][0] == {} and chain[i][1] is _MISSING:
            del chain[i - 1][0][keys[i - 1]]
    return True


_MISSING = object()


def put_back(path: str | Path = "params.yaml") -> str:
    """Under `dvc exp run`: put each rejected key back to its value in the experiment's baseline commit
    (what `-S` changed), keeping every other line of ``path`` as it is; what was done, or ""."""
    import io

    import yaml
    from ruamel.yaml import YAML

    rev, path = os.environ.get("DVC_EXP_BASELINE_REV"), Path(path)
    if not rev:
        return ""
    try:
        base_text = subprocess.run(["git", "show", f"{rev}:{path.as_posix()}"], capture_output=True, check=True,
                                   timeout=30).stdout.decode()
        base = yaml.safe_load(base_text) or {}
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError, yaml.YAMLError):
        return ""
    REJECTED.parent.mkdir(parents=True, exist_ok=True)
    REJECTED.write_bytes(path.read_bytes())
    rt = YAML()  # round trip, as `dvc exp run -S` writes the file
    rt.default_flow_style = False
    done: list[str] = []
    for _ in range(50):
        try:
            check(path)
            if yaml.safe_load(path.read_text()) == base:  # -S was the only change: the committed bytes
                path.write_text(base_text)
            return (f" ({', '.join(done)} put back to the experiment's baseline in {path}; the rejected file is "
                    f"{REJECTED})")
        except ConfigError as e:
            doc = rt.load(path.read_text())
            if not e.key or e.key in done or not _set(doc, e.key.split("."), base):
                break
            buf = io.StringIO()
            rt.dump(doc, buf)
            path.write_text(buf.getvalue())
            done.append(e.key)
    path.write_text(base_text)  # not a key-level change: the whole file goes back
    return f" ({path} is back at the experiment's baseline; the rejected file is {REJECTED})"


def main(path: str = "params.yaml", marker: str = MARKER) -> int:
    import sys

    try:
        check(path)
    except ConfigError as e:
        where = "" if str(e).startswith(f"{Path(path)}:") else f"{path}: "
        print(f"error: {where}{e}{put_back(path)}", file=sys.stderr)
        return 2
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    if not Path(marker).exists() or Path(marker).read_text() != MARKER_TEXT:
        Path(marker).write_text(MARKER_TEXT)
    print(f"{path}: valid (image profile and text-to-image section)")
    return 0
