"""Every pipeline path in one place; dvc.yaml mirrors these (``${profile}`` in place of the profile)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    profile: str
    root: Path = Path(".")

    def _p(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # data and references
    @property
    def train(self) -> Path:
        return self._p("data", self.profile, "train.npy")

    @property
    def ref(self) -> Path:
        return self._p("data", self.profile, "ref.npy")

    @property
    def featnet(self) -> Path:
        return self._p("models", self.profile, "featnet")

    def fid_ref(self, mode: str) -> Path:
        """Reference FID statistics of one clean-fid mode."""
        return self._p("stats", self.profile, f"fid_ref_{mode}.npz")

    def fid_search(self, mode: str) -> Path:
        """Statistics the merge and scale searches score against: images disjoint from the evaluation's reference."""
        return self._p("stats", self.profile, f"fid_search_{mode}.npz")

    def ref_features(self, mode: str) -> Path:
        """Features of (up to 10K of) the reference images, for KID (deme/stats.py)."""
        return self._p("stats", self.profile, f"ref_features_{mode}.npy")

    def features(self, name: str) -> Path:
        """The evaluation features of one Table 1 row, one array per training seed (paired bootstrap in the report)."""
        return self._p("features", self.profile, f"{name}.npz")

    def fid_heldout(self, mode: str) -> Path:
        """Statistics of the held-out set, when the headline reference is another (training images, built-in)."""
        return self._p("stats", self.profile, f"fid_heldout_{mode}.npz")

    # text-to-image: latents, prompt sets, benchmark references, CLIP model
    @property
    def latents(self) -> Path:
        """VAE latents of the training images (latents.npy), their prompts' token ids (tokens.npy)."""
        return self._p("latents", self.profile)

    def prompts(self, bench: str) -> Path:
        """A validated prompt set (coco, coco_proxy, imagenet, parti) written by the prepare stage."""
        return self._p("data", self.profile, "prompts", f"{bench}.json")

    def bench_ref(self, bench: str) -> Path:
        """The FID reference images of a benchmark (coco, imagenet), uint8 at benchmarks.fid_resolution."""
        return self._p("data", self.profile, "bench", f"{bench}.npy")

    def bench_stats(self, bench: str, mode: str) -> Path:
        return self._p("stats", self.profile, f"fid_{bench}_{mode}.npz")

    @property
    def clip(self) -> Path:
        return self._p("models", self.profile, "clip")

    # models
    @property
    def pretrained(self) -> Path:
        return self._p("models", self.profile, "pretrained")

    @property
    def published(self) -> Path:
        """A profile's published pretrained checkpoint, kept in git (checkpoints/<profile>/MODEL_CARD.md)."""
        return self._p("checkpoints", self.profile)

    @property
    def from_scratch(self) -> Path:
        """checkpoints/dvc.yaml's re-run of a published pretraining: model/, curve.csv, metrics.json."""
        return self._p("models", self.profile, "from-scratch")

    @property
    def deme_dir(self) -> Path:
        return self._p("models", self.profile, "deme")

    def interval(self, i: int, seed: int | None = None) -> Path:
        """Interval i's folder, or (``seed``) the model of one training seed in it."""
        folder = self.deme_dir / f"interval-{i}"
        return folder if seed is None else folder / f"seed-{seed}"

    def method(self, name: str) -> Path:
        """A single-model method's directory, one ``seed-<s>`` model per training seed."""
        return self._p("models", self.profile, name if name == "plain" else f"baselines/{name}")

    @property
    def buffer(self) -> Path:
        return self._p("buffers", self.profile, "difftuning.npy")

    def merged(self, seed: int | None = None) -> Path:
        """The merged models' folder, or (``seed``) the merge of one training seed's interval models."""
        folder = self._p("models", self.profile, "merged")
        return folder if seed is None else folder / f"seed-{seed}"

    def sweep_dir(self, run: str) -> Path:
        """The interval models and the merged model of one sweep run (Table 3, Fig. 8)."""
        return self._p("models", self.profile, "sweep", run)

    def sweep_metrics(self, run: str) -> Path:
        """One sweep run's FIDs (outside metrics/<profile>/, which the main report reads as a whole)."""
        return self._p("sweeps", self.profile, f"{run}.json")

    @property
    def sweep_report_dir(self) -> Path:
        return self._p("reports", f"{self.profile}_sweep")

    def analysis(self, name: str) -> Path:
        """The raw data of one analysis figure (npz), a DVC output the figure is drawn from."""
        return self._p("analysis", self.profile, f"{name}.npz")

    def figures(self, name: str) -> Path:
        """The figures drawn from one analysis's npz (PNG and PDF of each)."""
        return self._p("figures", self.profile, name)

    # metrics, curves, samples, resumable checkpoints
    def metrics(self, *name: str) -> Path:
        return self._p("metrics", self.profile, *name[:-1], f"{name[-1]}.json")

    def curve(self, name: str) -> Path:
        return self._p("plots", self.profile, f"{name}.csv")

    def samples(self, name: str) -> Path:
        return self._p("samples", self.profile, f"{name}.png")

    def ckpt(self, label: str) -> Path:
        return self._p(".ckpt", self.profile, label)

    @property
    def report_dir(self) -> Path:
        return self._p("reports", self.profile)
