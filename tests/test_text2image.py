"""Text-to-image components (deme/text2image.py): the real loading path of sd14 on tiny components in the Hub
cache layout, the tokenizer, conditional training with the consistency loss and channel-wise projection,
classifier-free guidance with the ensemble, the latent stream."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deme.config import config_from_mapping


def micro(**overrides):
    return config_from_mapping({"t2i": {"profile": "micro_t2i", **overrides}}, "t2i")


@pytest.fixture(scope="module")
def comps(tmp_path_factory):
    from deme.text2image import Components, build_text_encoder, build_tokenizer, build_vae, sd_scheduler_config

    cfg = micro()
    tok = build_tokenizer(cfg.pipeline.text_encoder.max_length, tmp_path_factory.mktemp("tok"))
    vae = build_vae(cfg).eval()
    vae.register_to_config(scaling_factor=0.5)
    return Components(tok, build_text_encoder(cfg, 0), vae, sd_scheduler_config(cfg))


def tiny_unet(cfg, seed=0):
    from deme.text2image import build_cond_unet

    torch.manual_seed(seed)
    return build_cond_unet(cfg, cfg.data.resolution // cfg.pipeline.vae.factor).eval()


def test_tokenizer_is_clips_bpe(comps):
    """The tokenizer built offline from open_clip's vocabulary gives OpenAI CLIP's ids (SD's tokenizer)."""
    import open_clip

    text = "a small red circle on a navy background"
    ours = comps.tokens([text])[0].tolist()
    ref = open_clip.get_tokenizer("ViT-B-32")([text])[0].tolist()
    n = len([t for t in ref if t != 0])
    assert ours[:n] == ref[:n]
    assert ours[0] == 49406 and ours[n - 1] == 49407 and len(ours) == comps.max_length


def test_conditional_projection_is_identity_at_init():
    from deme.projection import add_channel_projection, projected_blocks, projection_parameters

    cfg = micro()
    unet = tiny_unet(cfg)
    x, t, h = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 16, cfg.pipeline.unet.cross_attention_dim)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=h).sample
        add_channel_projection(unet)
        after = unet(x, t, encoder_hidden_states=h).sample
    assert torch.allclose(before, after, atol=1e-6)
    assert len(projected_blocks(unet)) == 2 * len(cfg.pipeline.unet.block_out_channels) + 1
    assert projection_parameters(unet) > 0


def test_consistency_teacher_sees_the_same_prompt():
    """At init the student (pretrained + identity projections) equals the teacher under the same prompt:
    the consistency term is 0; under a different prompt it is not."""
    from deme.objectives import EpsObjective
    from deme.projection import add_channel_projection
    from deme.schedule import alphas_cumprod

    cfg = micro()
    teacher, student = tiny_unet(cfg), add_channel_projection(tiny_unet(cfg))
    h = torch.randn(4, 16, cfg.pipeline.unet.cross_attention_dim)
    obj = EpsObjective(alphas_cumprod(cfg.schedule).float(), 0, 500, p=0.3, teacher=teacher)
    x0 = torch.randn(4, 4, 8, 8)
    _, terms = obj(student, x0, torch.Generator().manual_seed(0), cond={"encoder_hidden_states": h})
    assert float(terms["loss_consistency"]) < 1e-10

    class OtherPrompt(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, t, encoder_hidden_states):
            return self.m(x, t, encoder_hidden_states=encoder_hidden_states + 1.0)

    _, terms = obj(OtherPrompt(student), x0, torch.Generator().manual_seed(0), cond={"encoder_hidden_states": h})
    assert float(terms["loss_consistency"]) > 1e-6


class Recorder(torch.nn.Module):
    """A UNet stand-in that records which model served which call and the batch it saw."""

    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, encoder_hidden_states):
        from types import SimpleNamespace

        self.log.append((self.name, int(torch.as_tensor(t).flatten()[0]), x.shape[0],
                         encoder_hidden_states[:, 0, 0].tolist()))
        return SimpleNamespace(sample=torch.zeros_like(x))


def test_cfg_with_the_ensemble_switches_models_for_both_branches(comps):
    from deme.sample import Ensemble
    from deme.text2image import cfg_sample

    cfg = micro(sample={"sampler": "ddim", "steps": 8}, pipeline={"guidance_scale": 7.5})
    log = []
    ens = Ensemble([Recorder("I1", log), Recorder("I2", log)], 1000)
    cond = torch.full((3, 16, 16), 2.0)
    uncond = torch.full((1, 16, 16), -1.0)
    cfg_sample(ens, cond, uncond, torch.randn(3, 4, 8, 8), cfg, comps.scheduler_config)
    assert len(log) == 8  # one call per step serves both branches
    for name, t, batch, first in log:
        assert name == ("I1" if t < 500 else "I2")
        assert batch == 6 and first == [-1.0] * 3 + [2.0] * 3  # [unconditional; conditional]
    assert {n for n, *_ in log} == {"I1", "I2"}


def test_guidance_formula(comps):
    """eps = eps_u + s (eps_c - eps_u): with a UNet that returns its prompt value, one DDIM step from x moves
    by the guided epsilon."""
    from types import SimpleNamespace

    from deme.text2image import cfg_sample

    class Echo(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states):
            return SimpleNamespace(sample=encoder_hidden_states[:, :1, :1, None].expand_as(x).clone())

    outs = {}
    for s in (1.0, 3.0):
        cfg = micro(sample={"sampler": "ddim", "steps": 1}, pipeline={"guidance_scale": s})
        outs[s] = cfg_sample(Echo(), torch.full((1, 2, 4), 1.0), torch.full((1, 2, 4), 0.0),
                             torch.zeros(1, 4, 8, 8), cfg, comps.scheduler_config)
    # eps_u = 0, eps_c = 1: guided eps = s, so the x0 estimate (and the step) scales with s
    assert torch.allclose(outs[3.0], 3 * outs[1.0], atol=1e-5)


def test_latent_stream_is_seeded_and_drops_captions():
    from deme.text2image import LatentStream

    lat = np.random.default_rng(0).normal(size=(100, 4, 2, 2)).astype(np.float16)
    tok = np.arange(100 * 5, dtype=np.int32).reshape(100, 5)
    empty = np.full(5, 7, np.int32)
    a, b = LatentStream(lat, tok, empty, 10, seed=3), LatentStream(lat, tok, empty, 10, seed=3)
    for m in (0, 5, 12):
        (xa, ia), (xb, ib) = a(m), b(m)
        assert torch.equal(xa, xb) and torch.equal(ia, ib)
    x, ids = a(0)  # rows of a batch stay paired: latent i with caption i
    for row_x, row_i in zip(x, ids):
        i = int(row_i[0]) // 5
        assert torch.equal(row_x, torch.from_numpy(lat[i].astype(np.float32)))
    dropped = LatentStream(lat, tok, empty, 50, seed=3, caption_dropout=0.5)
    _, ids = dropped(0)
    frac = float((ids == 7).all(1).float().mean())
    assert 0.2 < frac < 0.8


def test_vae_scaling_factor_gives_unit_latents():
    from deme.data.shapes import generate_shapes
    from deme.text2image import train_vae

    cfg = micro(pipeline={"vae": {"iterations": 5}})
    images = generate_shapes(256, 0, 16).images
    vae, stats = train_vae(cfg, images, 0, torch.device("cpu"))
    assert vae.config.scaling_factor == pytest.approx(stats["scaling_factor"])
    from deme.train import to_model_range

    with torch.no_grad():
        z = vae.encode(to_model_range(torch.from_numpy(images[:256]))).latent_dist.mean * stats["scaling_factor"]
    assert float(z.std()) == pytest.approx(1.0, rel=1e-3)


# ----------------------------------------------------------------------------------------------------
# The sd14 loading path on tiny components in the Hugging Face cache layout


def save_tiny_pipeline(folder: Path, cfg, comps) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    sched = PNDMScheduler.from_config({k: v for k, v in comps.scheduler_config.items() if not k.startswith("_")})
    StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                            unet=tiny_unet(cfg), scheduler=sched, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)


def hub_cfg(**model):
    cfg = micro()
    return config_from_mapping({"t2i": {"profile": "micro_t2i", "model": {
        "source": "hub", "pretrained_id": "CompVis/stable-diffusion-v1-4", **model}}}, "t2i"), cfg


def test_sd14_pipeline_loads_from_the_hub_cache(tmp_path, monkeypatch, comps, no_network):
    from huggingface_hub import constants

    from deme.text2image import check_cond_architecture, fetch_pipeline

    cfg, base = hub_cfg()
    repo = tmp_path / "hub" / "models--CompVis--stable-diffusion-v1-4"
    snap = repo / "snapshots" / ("a" * 40)
    save_tiny_pipeline(snap, base, comps)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import diffusers.utils.constants as dconst
    monkeypatch.setattr(dconst, "HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    try:
        pipe, source = fetch_pipeline(cfg)
    except Exception as e:  # diffusers reads the cache dir at import: pass it explicitly as users do
        pytest.fail(f"cache load failed: {e}")
    assert source == "hf://CompVis/stable-diffusion-v1-4"
    check_cond_architecture(pipe.unet, cfg)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and type(pipe.text_encoder).__name__ == "CLIPTextModel"


def test_sd14_pipeline_from_local_path_and_architecture_check(tmp_path, comps, no_network):
    from deme.models import CheckpointError
    from deme.text2image import check_cond_architecture, fetch_pipeline

    cfg, base = hub_cfg(local_path=str(tmp_path / "sd"))
    save_tiny_pipeline(tmp_path / "sd", base, comps)
    pipe, source = fetch_pipeline(cfg)
    assert source == str(tmp_path / "sd")
    wrong = config_from_mapping({"t2i": {"profile": "sd14"}}, "t2i")
    with pytest.raises(CheckpointError, match="block_out_channels"):
        check_cond_architecture(pipe.unet, wrong)


def test_missing_sd14_fails_fast_with_the_fetch_command(tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants

    from deme.models import CheckpointError
    from deme.text2image import fetch_pipeline

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    cfg, _ = hub_cfg()
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        fetch_pipeline(cfg)
    assert time.perf_counter() - t0 < 10
    msg = str(e.value)
    assert "CompVis/stable-diffusion-v1-4" in msg and "huggingface-cli download" in msg
    cfg, _ = hub_cfg(local_path=str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="model_index.json"):
        fetch_pipeline(cfg)


def test_pretrain_stage_imports_the_pipeline_and_components_reload(tmp_path, monkeypatch, comps, no_network):
    """stages/pretrain.py --t2i on a hub profile: a StableDiffusionPipeline folder that load_components and
    StableDiffusionPipeline.from_pretrained read back, with the UNet finetuning starts from."""
    import yaml

    from deme.cli import run_stage
    from deme.models import load_pretrained
    from deme.text2image import load_components

    _, base = hub_cfg()
    save_tiny_pipeline(tmp_path / "sd", base, comps)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"profile": "micro", "t2i": {
        "profile": "micro_t2i", "model": {"source": "hub", "pretrained_id": "CompVis/stable-diffusion-v1-4",
                                          "local_path": str(tmp_path / "sd")}}}))
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_stage", Path(__file__).resolve().parents[1] / "stages/pretrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert run_stage("pretrain", mod.__doc__, mod.body, argv=["--t2i"]) == 0
    cfg, _ = hub_cfg(local_path=str(tmp_path / "sd"))
    out = tmp_path / "models/micro_t2i/pretrained"
    assert json.loads((out / "model_index.json").read_text())["unet"][1] == "UNet2DConditionModel"
    loaded = load_components(out)
    assert loaded.scaling_factor == 0.5
    assert loaded.tokens(["a red circle"]).tolist() == comps.tokens(["a red circle"]).tolist()
    unet = load_pretrained(cfg)
    assert type(unet).__name__ == "UNet2DConditionModel"
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)


def test_launcher_reads_the_t2i_sections_process_count(tmp_path):
    import yaml

    from deme.launch import num_processes

    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"profile": "micro", "runtime": {"num_processes": 3},
                                 "t2i": {"profile": "micro_t2i", "runtime": {"num_processes": 2}}}))
    assert num_processes(["--params", str(p), "--interval", "1"]) == 3
    assert num_processes(["--t2i", "--params", str(p), "--interval", "1"]) == 2


def test_benchmark_seeds_are_disjoint_and_never_the_searchs():
    from deme.io import sample_seeds
    from deme.text2image import bench_seeds

    sets = [set(bench_seeds(b, 5000, 3)) for b in ("coco", "imagenet", "parti")]
    assert all(len(s) == 5000 for s in sets)
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    search = set(sample_seeds("search", 5000, 3))
    assert not any(s & search for s in sets)
    assert list(bench_seeds("coco", 3, 3)) == list(bench_seeds("coco", 10, 3))[:3]  # a prefix: counts can grow
