"""Train the toy world's text-to-image diffusion model, conditioned on the toy world's CLIP.

It plays Stable Diffusion's part in the toy world: custom tokens are trained through it (Perera et al.'s l_SD)
and GAIR generates with it. Like SD it is a latent diffusion model (Rombach et al. 2022): a small
`AutoencoderKL` is trained first on the world's renders (stage 1: L1 + L2 reconstruction plus SD's KL weight
1e-6; 64 px -> 16x16x8 latents, scaled to unit variance as SD's 0.18215 does), then a `UNet2DConditionModel`
on its latents (stage 2), attending to the per-position final hidden states of a FROZEN CLIP text tower (all
77 positions, padded with end-of-text, as SD 1.x), trained with the LDM loss (DDPM forward process, Ho et al.
2020; v-prediction, Salimans & Ho 2022, as SD 2.x) and caption dropout for classifier-free guidance (Ho &
Salimans 2022). The latent space is what makes the budget: a UNet step at 16x16 costs a third of one at
32x32, so ~3x the steps fit the same CPU time (the previous model denoised 32x32x12 SpaceToDepth pixels and,
after 1500 steps, drew category 0.505 and pattern 0.295: issue #13). Cross-attention at the two lowest levels
(8x8 and 4x4). It samples with the `sampling` field's setting (measured best in `eval_samplers`).

Pairs are rendered on the fly (one batch ~30 ms), never stored. The (context, category, colour) triples of the
evaluation scenes are held out of training, so the evaluation prompts are compositions the model never saw.
Both stages checkpoint every `checkpoint_every` steps; a killed run started again with the same command resumes
from the last checkpoint and ends with the same weights as an uninterrupted one.

    python -m benchmarks.world.train_diffusion --preset toyworld-v2

writes retrieval/models/weights/toyworld/diffusion/ (what `load_diffusion("toyworld")` loads): unet/ and vae/
(fp16), scheduler/, backbone.json (with this config), train_log.json and eval.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from benchmarks.world import evaluate
from benchmarks.world.captions import (
    CAPTION_TEMPLATES,
    CONTEXT_WORDS,
    POSE_WORDS,
    caption,
    detail_phrase,
    garment_phrase,
)
from benchmarks.world.checkpoint import default_folder, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from benchmarks.world.config import WorldConfig, world_config
from benchmarks.world.render import render_scene
from benchmarks.world.scene import sample_scene
from benchmarks.world.schedule import warmup_cosine_lr
from benchmarks.world.sheet import contact_sheet
from retrieval.models.clip import TOYWORLD_WEIGHTS

DEFAULT_OUT = TOYWORLD_WEIGHTS / "diffusion"
STREAM = 0xD1FF  # training pairs come from default_rng([seed, STREAM]): not the CLIP's [seed, chunk] nor HELD_OUT_SEED


@dataclass(frozen=True)
class DiffusionTrainConfig:
    # ----- reproducibility and data
    seed: int = 0  # seeds the UNet init, the pairs, the caption dropout, noise and timesteps
    world_preset: str = "pervl"  # toy-world preset the pairs are drawn from
    image_size: int = 64  # rendered image side, px (the world's 64; smaller for the smoke test)
    clip: str = "toyworld"  # CLIP spec of the frozen text encoder (retrieval.models.clip)
    caption_dropout: float = 0.1  # fraction of captions replaced by "" for classifier-free guidance
    # share of captions that also name the garment's details (issue #13, section 3; captions.caption). 0 for the
    # committed model; the CLIP it is conditioned on must know those words too (train_clip's field of that name)
    detail_caption_share: float = 0.0
    # ----- stage 1: the latent codec. "vae": an AutoencoderKL trained here first (SD's design); "space-to-depth":
    # the pixels rearranged losslessly (codec_factor^2 x 3 channels), no stage 1
    codec: str = "vae"
    codec_factor: int = 2  # space-to-depth only: block side (64x64x3 px -> 32x32x12)
    vae_block_out_channels: tuple[int, ...] = (32, 64, 64)  # one halving per extra level: 64 px -> 16x16 latents
    # SD: 4 at factor 8. Measured here after 600 steps, readback of reconstructions (category / colour / pattern):
    # 4 channels 0.48 / 0.49 / 0.58, 8 channels 0.64 / 0.87 / 0.79
    latent_channels: int = 8
    vae_steps: int = 2000  # optimizer steps of stage 1
    vae_batch_size: int = 64
    vae_crop: int = 32  # stage 1 trains on random crops of this side (the AE is fully convolutional: no attention)
    vae_lr: float = 1e-3  # peak learning rate (warmup 50, cosine to 0)
    vae_kl_weight: float = 1e-6  # KL(q(z|x) || N(0, I)) weight: SD's autoencoder's
    # Tried and dropped (2026-12-02): an L1 loss on the reconstruction error's horizontal and vertical differences
    # (an image-gradient loss, cf. Mathieu et al. 2016's gradient difference loss, eq. 5), weight 1, as a stand-in
    # for SD's perceptual loss. Readback of 200 autoencoded held-out renders after 600 steps, same seed, with / without:
    # category 0.525 / 0.65, colour 0.77 / 0.905, pattern 0.61 / 0.765 (context 1.00 both): worse on every word
    # ----- stage 2: UNet2DConditionModel on the latents
    block_out_channels: tuple[int, ...] = (64, 96, 128)  # channels per resolution level (16, 8, 4 for 64 px)
    layers_per_block: int = 1  # resnet (+ attention) layers per level
    attention_levels: int = 2  # cross-attention only in the lowest N levels (CPU cost)
    attention_heads: int = 8  # heads of each attention layer (diffusers' attention_head_dim)
    # ----- diffusion (DDPM forward process)
    num_train_timesteps: int = 1000  # T (Ho et al. 2020)
    beta_schedule: str = "squaredcos_cap_v2"  # cosine (Nichol & Dhariwal 2021): better than linear at small sides
    prediction_type: str = (
        "v_prediction"  # what the UNet predicts: epsilon (SD 1.x), v_prediction (SD 2.x 768) or sample.
    )
    # v: with the cosine schedule's ~zero terminal SNR, epsilon's x0 estimate
    # at high noise is eps error / sqrt(abar) (measured: worse than the mean image)
    # ----- optimisation: AdamW, linear warmup then cosine decay to 0
    steps: int = 4000  # optimizer steps of stage 2
    batch_size: int = 64  # pairs per step
    lr: float = 1e-3  # peak learning rate
    warmup: int = 100  # linear warmup steps
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm; 0: none
    ema_decay: float = 0.995  # EMA of the weights (saved and evaluated); 0: none. Warmed up as (1+n)/(10+n)
    # ----- logging and evaluation
    log_every: int = 25  # steps between training-log entries
    checkpoint_every: int = 200  # steps between resumable checkpoints of either stage (with `checkpoint_dir`); 0: none
    eval_scenes: int = 200  # held-out scenes: their captions are generated and classified
    # ----- sampling: the default setting saved in backbone.json (what load_diffusion uses unless a caller overrides
    # it) is the best of `eval_samplers` on the held-out captions (eval.json's "best"); `sampling` is the fallback
    # when evaluation is skipped. On the previous pixel-space model Euler ancestral 25 steps at guidance 4 was best:
    # the deterministic samplers kept the small model's errors, fresh noise each step washed them out.
    sampling: tuple[str, int, float] = ("euler-a", 25, 4.0)
    # (sampler, steps, guidance scale) settings compared at the end, each on eval_scenes captions (~20 s each)
    eval_samplers: tuple[tuple[str, int, float], ...] = (
        ("euler-a", 25, 2.0),
        ("euler-a", 25, 4.0),
        ("euler-a", 25, 6.0),
        ("ddim", 25, 4.0),
        ("dpm++", 20, 4.0),
    )

    def __post_init__(self):
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.codec not in ("vae", "space-to-depth"):
            raise ValueError(f"codec must be 'vae' or 'space-to-depth', got {self.codec!r}")
        if not 1 <= self.attention_levels <= len(self.block_out_channels):
            raise ValueError(
                f"attention_levels must be in [1, {len(self.block_out_channels)}], got {self.attention_levels}"
            )
        f = self.latent_factor
        if self.image_size % f or (self.image_size // f) % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(
                f"image_size {self.image_size} / latent factor {f} must be divisible by "
                f"2^{len(self.block_out_channels) - 1} (one halving per extra UNet level)"
            )
        if self.codec == "vae" and (self.vae_crop % f or self.vae_crop > self.image_size):
            raise ValueError(f"vae_crop {self.vae_crop} must be a multiple of {f} and at most image_size")

    @property
    def latent_factor(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.vae_block_out_channels) - 1) if self.codec == "vae" else self.codec_factor

    @property
    def unet_channels(self) -> int:
        """Channels of the latents the UNet denoises."""
        return self.latent_channels if self.codec == "vae" else 3 * self.codec_factor**2


# Named presets are data. `toyworld`: the committed model; `smoke`: the test twin (seconds).
DIFFUSION_TRAIN_PRESETS: dict[str, dict] = {
    "toyworld": {},
    # on the CLIP of train_clip's preset of that name, in its world (README)
    "toyworld-v2": {"detail_caption_share": 0.5, "world_preset": "pervl-v2-views"},
    "smoke": {
        "clip": "tiny-random",
        "image_size": 32,
        "vae_block_out_channels": (8, 16),
        "vae_steps": 4,
        "vae_batch_size": 8,
        "vae_crop": 16,
        "block_out_channels": (16, 32),
        "attention_levels": 1,
        "layers_per_block": 1,
        "attention_heads": 4,
        "steps": 8,
        "batch_size": 8,
        "lr": 2e-3,
        "warmup": 1,
        "log_every": 1,
        "checkpoint_every": 2,
        "eval_scenes": 4,
        "sampling": ("ddim", 2, 3.0),
        "eval_samplers": (("ddim", 2, 1.0), ("euler-a", 2, 3.0)),
    },
}


def diffusion_train_config(preset: str = "toyworld", **overrides) -> DiffusionTrainConfig:
    """A named preset with optional field overrides: diffusion_train_config("smoke", steps=3)."""
    if preset not in DIFFUSION_TRAIN_PRESETS:
        raise KeyError(f"unknown diffusion training preset {preset!r}; known: {sorted(DIFFUSION_TRAIN_PRESETS)}")
    return DiffusionTrainConfig(**{**DIFFUSION_TRAIN_PRESETS[preset], **overrides})


# ----------------------------------------------------------------------------------------------- parts
def unet_config(config: DiffusionTrainConfig, cross_attention_dim: int) -> dict:
    """diffusers UNet2DConditionModel kwargs: plain resnet levels on top, cross-attention at the lowest ones."""
    n = len(config.block_out_channels)
    attn = [i >= n - config.attention_levels for i in range(n)]  # level i has cross-attention
    return {
        "sample_size": config.image_size // config.latent_factor,
        "in_channels": config.unet_channels,
        "out_channels": config.unet_channels,
        "block_out_channels": tuple(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": config.attention_heads,
        "norm_num_groups": min(32, config.block_out_channels[0] // 2),
    }


def vae_config(config: DiffusionTrainConfig) -> dict:
    """diffusers AutoencoderKL kwargs: SD's layout, smaller, without the mid-block attention (fully convolutional,
    so it trains on crops and runs on any image size)."""
    n = len(config.vae_block_out_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * n,
        "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": tuple(config.vae_block_out_channels),
        "layers_per_block": 1,
        "latent_channels": config.latent_channels,
        "norm_num_groups": min(32, config.vae_block_out_channels[0] // 2),
        "sample_size": config.image_size,
        "mid_block_add_attention": False,
    }


def scheduler_config(config: DiffusionTrainConfig) -> dict:
    # clip_sample: space-to-depth latents ARE pixels in [-1, 1], so predicted x0 is clipped to that range while
    # sampling; VAE latents (unit variance, unbounded) are not clipped, as SD's are not
    return {
        "num_train_timesteps": config.num_train_timesteps,
        "beta_schedule": config.beta_schedule,
        "prediction_type": config.prediction_type,
        "clip_sample": config.codec == "space-to-depth",
    }


def build_backbone(config: DiffusionTrainConfig, clip=None, device: str | torch.device = "auto", vae=None):
    """A fresh, seeded DiffusionBackbone: new UNet, DDPM scheduler, the codec (VAE: the trained `vae`), frozen CLIP."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from retrieval.models.diffusion import DiffusionBackbone, SpaceToDepthCodec, TextConditioning, VaeCodec
    from retrieval.models.encoders import ClipEncoder

    if config.codec == "vae" and vae is None:
        raise ValueError("the vae codec needs the trained autoencoder (train_autoencoder)")
    clip = clip or ClipEncoder.from_spec(config.clip, device=str(device), precision="fp32")
    torch.manual_seed(config.seed)
    unet = UNet2DConditionModel(**unet_config(config, clip.width))
    codec = VaeCodec(vae) if config.codec == "vae" else SpaceToDepthCodec(config.codec_factor)
    # SD 1.x's convention: pad with end-of-text, final layer
    name, steps, guidance = config.sampling
    return DiffusionBackbone(
        unet,
        DDPMScheduler(**scheduler_config(config)),
        codec,
        clip,
        TextConditioning(pad_id=49407, skip_last_layers=0),
        device=device,
        sampling={"sampler": name, "steps": steps, "guidance_scale": guidance},
    )


# ----------------------------------------------------------------------------------------------- data
def triple(scene) -> tuple[str, str, str]:
    return scene.context, scene.category, scene.colour


def eval_caption(scene, index: int = 0, details: bool = False) -> str:
    """The full training-grammar caption of a scene: 'a person wearing a red striped dress standing on a beach.';
    DETAILS: with the garment's details named too ('... dress with a white collar standing ...')."""
    places = CONTEXT_WORDS[scene.context].places
    garment = garment_phrase(scene.category, scene.colour, scene.pattern)
    if details and (phrase := detail_phrase(scene.details)):
        garment = f"{garment} {phrase}"
    return CAPTION_TEMPLATES[0][0].format(
        g=garment,
        pose=POSE_WORDS[scene.pose].ing,
        place=places[index % len(places)],
    )


def held_out_triples(world: WorldConfig, config: DiffusionTrainConfig) -> set:
    """The (context, category, colour) triples of the evaluation scenes: no training scene of either stage has one."""
    return {triple(s) for s in evaluate.held_out_scenes(world, config.eval_scenes)}


def sample_batch(
    rng: np.random.Generator, world: WorldConfig, n: int, held_out: set, detail_share: float = 0.0
) -> tuple[list, list[str]]:
    """N training pairs rendered now: (PIL images, captions). `sample_training_pair`'s two steps, with scenes of
    held-out (context, category, colour) triples redrawn."""
    images, captions = [], []
    while len(images) < n:
        scene = sample_scene(rng, world)
        if triple(scene) in held_out:
            continue
        images.append(render_scene(scene, world))
        captions.append(caption(scene, rng, detail_share))
    return images, captions


# ----------------------------------------------------------------------------------------------- training
VAE_STREAM = 0xAE  # stage 1 renders come from default_rng([seed, VAE_STREAM])


def train_autoencoder(
    config: DiffusionTrainConfig,
    device: str = "auto",
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    on_step: Callable[[int], None] | None = None,
):
    """Stage 1: the AutoencoderKL on random crops of renders (held-out triples excluded). Returns (vae, log).

    Loss (per image, as Rombach et al.'s autoencoder sums it): L1 + L2 reconstruction summed over pixels plus
    vae_kl_weight x KL(q(z|x) || N(0, I)) summed over the latent; SD's perceptual (LPIPS) and adversarial terms
    are left out (no pretrained LPIPS network here). The latents are then scaled to unit variance: the VAE's
    `scaling_factor` (SD 1.x: 0.18215) is 1 / std of 256 renders' latents. ON_STEP(step) runs after each step."""
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    from retrieval.models.diffusion import pil_to_pixels
    from retrieval.models.precision import resolve_device

    dev = resolve_device(device)
    world = world_config(config.world_preset, image_size=config.image_size)
    held_out = held_out_triples(world, config)
    torch.manual_seed(config.seed)
    vae = AutoencoderKL(**vae_config(config)).to(dev).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng([config.seed, VAE_STREAM])
    gen = torch.Generator().manual_seed(config.seed)
    log: list[dict] = [{"stage": "vae", "params": sum(p.numel() for p in vae.parameters())}]
    start, elapsed0 = 0, 0.0
    state = load_checkpoint(checkpoint_dir, "vae", config)
    if state is not None:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(rng, state["rng"])
        gen.set_state(state["gen"])
        log, start, elapsed0 = json.loads(state["log"]), int(state["step"]), float(state["elapsed"])
    crop, size = config.vae_crop, config.image_size
    t_loop = time.time() - elapsed0
    bar = tqdm(
        range(start, config.vae_steps),
        disable=not progress,
        desc="train autoencoder",
        initial=start,
        total=config.vae_steps,
    )
    for step in bar:
        images, _ = sample_batch(rng, world, config.vae_batch_size, held_out)
        i, j = rng.integers(0, size - crop + 1, 2)
        x = pil_to_pixels(images)[:, :, i : i + crop, j : j + crop].to(dev)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, config.vae_lr, min(50, config.vae_steps), config.vae_steps)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(gen)).sample
        err = recon - x
        rec = (err.abs() + err.square()).flatten(1).sum(1).mean()
        kl = dist.kl().mean()
        loss = (rec + config.vae_kl_weight * kl) / x[0].numel()  # per-pixel scale for the optimizer
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        elapsed = time.time() - t_loop
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % config.log_every == 0 or step == config.vae_steps - 1:
            log.append(
                {
                    "stage": "vae",
                    "step": step,
                    "loss": round(loss.item(), 5),
                    "kl": round(kl.item(), 2),
                    "elapsed_s": round(elapsed, 1),
                }
            )
            if not progress:
                print(json.dumps(log[-1]), flush=True)
        if config.checkpoint_every and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.vae_steps):
            save_checkpoint(
                checkpoint_dir,
                "vae",
                config,
                {
                    "step": step + 1,
                    "elapsed": elapsed,
                    "model": vae.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": rng_state(rng),
                    "gen": gen.get_state(),
                    "log": json.dumps(log),
                },
            )
        if on_step is not None:
            on_step(step)
    vae.eval().requires_grad_(False)
    # unit-variance latents (SD's scaling factor, LDM's scale_by_std: the std of sampled latents), measured on
    # renders of their own stream
    scale_rng = np.random.default_rng([config.seed, VAE_STREAM, 1])
    images, _ = sample_batch(scale_rng, world, 256, held_out)
    with torch.no_grad():
        latents = vae.encode(pil_to_pixels(images).to(dev)).latent_dist.sample(torch.Generator().manual_seed(0))
        std = float(latents.std())
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    log.append({"stage": "vae", "latent_std": round(std, 5), "scaling_factor": vae.config.scaling_factor})
    return vae, log


@dataclass
class TrainResult:
    backbone: object  # DiffusionBackbone holding the trained (EMA) UNet, eval mode
    log: list[dict]  # training-log entries (stage 1's, then stage 2's)
    seconds: float  # wall time of stage 2's loop
    seconds_per_step: float  # mean wall time of one stage 2 step


def train_diffusion(
    config: DiffusionTrainConfig,
    clip=None,
    device: str = "auto",
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    on_step: Callable[[str, int], None] | None = None,
) -> TrainResult:
    """Train the autoencoder (stage 1, codec "vae") and then the UNet (stage 2, text encoder frozen) on pairs
    rendered on the fly; the loops here are the whole recipe. With CHECKPOINT_DIR each stage resumes from its
    last checkpoint there (same config: else CheckpointMismatch). ON_STEP(stage, step) runs after each step."""
    from tqdm import tqdm

    from retrieval.models.diffusion import pil_to_pixels

    world = world_config(config.world_preset, image_size=config.image_size)

    # 1. parts: stage 1's autoencoder, a fresh UNet on the frozen CLIP; the EMA copy is what gets saved
    vae, log = None, []
    if config.codec == "vae":
        vae, log = train_autoencoder(
            config, device, progress, checkpoint_dir, (lambda step: on_step("vae", step)) if on_step else None
        )
    backbone = build_backbone(config, clip, device, vae=vae)
    unet = backbone.unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False) if config.ema_decay else None
    n_params = sum(p.numel() for p in unet.parameters())

    # 2. data streams: pairs, caption dropout, noise and timesteps, latent samples each from their own seeded generator
    rng = np.random.default_rng([config.seed, STREAM])
    held_out = held_out_triples(world, config)
    noise_gen = torch.Generator().manual_seed(config.seed)
    latent_gen = torch.Generator().manual_seed(config.seed + 1)

    # 3. optimizer
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    # 4. resume
    stage_log: list[dict] = [
        {"stage": "unet", "params": n_params, "held_out_triples": len(held_out), "device": str(backbone.device)}
    ]
    start, elapsed0 = 0, 0.0
    state = load_checkpoint(checkpoint_dir, "unet", config)
    if state is not None:
        unet.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(rng, state["rng"])
        noise_gen.set_state(state["noise_gen"])
        latent_gen.set_state(state["latent_gen"])
        stage_log, start, elapsed0 = json.loads(state["log"]), int(state["step"]), float(state["elapsed"])

    # 5. the loop
    t_loop = time.time() - elapsed0
    bar = tqdm(
        range(start, config.steps), disable=not progress, desc="train diffusion", initial=start, total=config.steps
    )
    for step in bar:
        # 5.1 batch: render, drop captions to "" (classifier-free guidance), encode text with the frozen CLIP
        images, captions = sample_batch(rng, world, config.batch_size, held_out, config.detail_caption_share)
        captions = ["" if u < config.caption_dropout else c for u, c in zip(rng.random(len(captions)), captions)]
        latents = backbone.encode_images(pil_to_pixels(images), latent_gen)  # (B, C, h, w)
        with torch.no_grad():
            cond = backbone.conditioning(captions)  # (B, 77, width)
        # 5.2 learning rate
        lr = warmup_cosine_lr(step, config.lr, config.warmup, config.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # 5.3 the LDM loss at random timesteps, backward, clip, step
        loss = backbone.training_loss(latents, cond, noise_gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip or float("inf"))
        optimizer.step()
        # 5.4 EMA of the weights
        if ema is not None:
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), unet.parameters()):
                    p_ema.lerp_(p, 1 - decay)
        # 5.5 log, and a resumable checkpoint
        elapsed = time.time() - t_loop
        bar.set_postfix(loss=f"{loss.item():.4f}", s_step=f"{elapsed / (step + 1 - start):.2f}")
        if step % config.log_every == 0 or step == config.steps - 1:
            stage_log.append(
                {
                    "stage": "unet",
                    "step": step,
                    "loss": round(loss.item(), 5),
                    "lr": lr,
                    "grad_norm": round(float(grad_norm), 4),
                    "elapsed_s": round(elapsed, 1),
                }
            )
            if not progress:
                print(json.dumps(stage_log[-1]), flush=True)
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            save_checkpoint(
                checkpoint_dir,
                "unet",
                config,
                {
                    "step": step + 1,
                    "elapsed": elapsed,
                    "model": unet.state_dict(),
                    "ema": (ema or unet).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": rng_state(rng),
                    "noise_gen": noise_gen.get_state(),
                    "latent_gen": latent_gen.get_state(),
                    "log": json.dumps(stage_log),
                },
            )
        if on_step is not None:
            on_step("unet", step)
    seconds = time.time() - t_loop

    # 6. the trained backbone holds the EMA weights
    if ema is not None:
        unet.load_state_dict(ema.state_dict())
    unet.eval().requires_grad_(False)
    steps_run = max(1, config.steps)
    return TrainResult(backbone=backbone, log=log + stage_log, seconds=seconds, seconds_per_step=seconds / steps_run)


# ----------------------------------------------------------------------------------------------- evaluation
def generate_for(backbone, captions: list[str], setting: tuple[str, int, float], batch_size: int = 50) -> list:
    """One image per caption with a (sampler, steps, guidance) setting; image i uses seed i, whatever the batch."""
    from retrieval.models.diffusion import make_sampler

    name, steps, guidance = setting
    backbone.sample_scheduler = make_sampler(name, backbone.scheduler.config)
    return backbone.generate(captions, guidance_scale=guidance, steps=steps, seed=0, batch_size=batch_size)


@torch.no_grad()
def autoencode(backbone, images: list, batch_size: int = 50) -> list:
    """IMAGES through the backbone's codec and back (the latents' mean, no sampling): what the codec keeps."""
    from retrieval.models.diffusion import pil_to_pixels, to_pil

    out = []
    for start in range(0, len(images), batch_size):
        pixels = pil_to_pixels(images[start : start + batch_size]).to(backbone.device)
        vae = backbone.codec.vae
        latents = vae.encode(pixels).latent_dist.mode()
        out.extend(to_pil((vae.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1).cpu()))
    return out


def evaluate_generation(backbone, config: DiffusionTrainConfig) -> dict:
    """Generate one image per held-out scene caption with each (sampler, steps, guidance) setting of the config
    and report how often the toy world's CLIP reads the intended context, category, colour and pattern from it;
    beside the same CLIP's accuracy on the real renders of those scenes (the ceiling)."""
    world = world_config(config.world_preset, image_size=config.image_size)
    scenes = evaluate.held_out_scenes(world, config.eval_scenes)
    captions = [eval_caption(s, i) for i, s in enumerate(scenes)]
    real = evaluate.render_scenes(scenes, world)
    report = {
        "scenes": len(scenes),
        "held_out_seed": evaluate.HELD_OUT_SEED,
        "held_out_triples": "the (context, category, colour) triples of these scenes never occur in training",
        "caption_examples": captions[:3],
        "real_images": evaluate.zero_shot_report(backbone.clip, real, scenes, world),
        "generated": [],
    }
    if backbone.codec.kind == "vae":  # the codec's own ceiling: the real renders encoded and decoded
        report["autoencoded_images"] = evaluate.zero_shot_report(
            backbone.clip, autoencode(backbone, real), scenes, world
        )
    for setting in config.eval_samplers:
        t0 = time.time()
        images = generate_for(backbone, captions, setting)
        accuracy = evaluate.zero_shot_report(backbone.clip, images, scenes, world)
        name, steps, guidance = setting
        report["generated"].append(
            {
                "sampler": name,
                "steps": steps,
                "guidance": guidance,
                "accuracy": accuracy,
                "seconds": round(time.time() - t0, 1),
            }
        )
        print(f"{setting}: {accuracy} ({time.time() - t0:.0f} s)", flush=True)
    best = max(
        report["generated"],
        key=lambda r: sum(r["accuracy"][f] for f in ("context", "category", "colour", "pattern")),
    )
    report["best"] = {k: best[k] for k in ("sampler", "steps", "guidance")}
    setting = (best["sampler"], best["steps"], best["guidance"])
    report["details"] = detail_readback(backbone, scenes, real, world, setting)
    return report


def detail_readback(backbone, scenes, renders: list, world: WorldConfig, setting: tuple[str, int, float]) -> dict:
    """Section 3's check: for the scenes whose garment has details, captions that name them (`eval_caption(...,
    details=True)`) generated with SETTING; the toy CLIP's readback of the trim colour and the emblem shape, beside
    its readback of the scenes' RENDERS (the ceiling) and chance."""
    keep = [i for i, s in enumerate(scenes) if detail_phrase(s.details)]
    scenes = [scenes[i] for i in keep]
    captions = [eval_caption(s, i, details=True) for i, s in enumerate(scenes)]
    factors = evaluate.DETAIL_FACTORS
    real = evaluate.zero_shot_report(backbone.clip, [renders[i] for i in keep], scenes, world, factors)
    generated = evaluate.zero_shot_report(
        backbone.clip, generate_for(backbone, captions, setting), scenes, world, factors
    )
    chance = {"trim_colour": 1 / len(world.colours), "emblem": 1 / len(world.emblems)}  # zero-shot over all words
    return {
        "scenes": len(scenes),
        "caption_example": captions[0],
        "real_images": real,
        "generated": generated,
        "chance": chance,
    }


def sample_grid(images: list, captions: list[str], path: str | Path) -> Path:
    """Images (shown 192 px wide) with their captions in a grid of 4 columns (PNG), to look at."""
    lines = [textwrap.wrap(c, width=40) for c in captions]  # ~4.5 px per character: 40 fit under 192 px
    sheet = contact_sheet(images, lines, columns=4, zoom=max(1, 192 // images[0].size[0]), max_chars=40)
    sheet.save(path)
    return Path(path)


# ----------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> None:
    """Train the toy world's diffusion model, evaluate it, and write its folder."""
    from retrieval.io.atomic import write_json
    from retrieval.models.diffusion import load_diffusion, save_diffusion_folder

    parser = argparse.ArgumentParser(prog="python -m benchmarks.world.train_diffusion", description=main.__doc__)
    parser.add_argument("--preset", default="toyworld", choices=sorted(DIFFUSION_TRAIN_PRESETS), help="training recipe")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder to write (load_diffusion(folder) loads it)")
    parser.add_argument("--steps", type=int, help="override the preset's number of steps")
    parser.add_argument("--seed", type=int, help="override the preset's seed")
    parser.add_argument("--clip", help="override the preset's CLIP SPEC (the frozen text encoder), e.g. a model folder")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--grid", default="/tmp/toyworld_diffusion_samples.png", help="PNG of generated samples; '' for none"
    )
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    parser.add_argument(
        "--checkpoint-dir",
        help="folder for resumable checkpoints of both stages (default: OUT.checkpoints, removed once the model is "
        "written); run the same command again after a crash and it resumes there",
    )
    parser.add_argument("--eval-only", action="store_true", help="skip training: evaluate the model already in --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed), ("clip", args.clip)) if v is not None}
    config = diffusion_train_config(args.preset, **overrides)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else default_folder(args.out)
    print(f"training {args.preset}: {json.dumps(asdict(config))}", flush=True)

    # 1. train (resuming from checkpoint_dir), save (weights, config, log)
    if not args.eval_only:
        if (checkpoint_dir / "unet.pt").is_file() or (checkpoint_dir / "vae.pt").is_file():
            print(f"resuming from {checkpoint_dir}", flush=True)
        result = train_diffusion(
            config, device=args.device, progress=not args.no_progress, checkpoint_dir=checkpoint_dir
        )
        train_info = {
            "config": asdict(config),
            "preset": args.preset,
            "wall_seconds": round(result.seconds, 1),
            "seconds_per_step": round(result.seconds_per_step, 3),
            "torch_version": torch.__version__,
            "device": str(result.backbone.device),
            "threads": torch.get_num_threads(),
            "command": f"python -m benchmarks.world.train_diffusion --preset {args.preset}"
            + "".join(f" --{k} {v}" for k, v in overrides.items()),
        }
        folder = save_diffusion_folder(
            result.backbone, args.out, extra_config=train_info, extra_files={"train_log.json": result.log}
        )
        print(f"wrote {folder} ({result.seconds:.0f} s, {result.seconds_per_step:.2f} s/step)", flush=True)
        if not args.checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    # 2. evaluate the saved model through the loading path users take; its default sampling becomes the best setting
    backbone = load_diffusion(args.out, device=args.device)
    report = evaluate_generation(backbone, config)
    best = report["best"]
    sampling = {"sampler": best["sampler"], "steps": best["steps"], "guidance_scale": best["guidance"]}
    if sampling != backbone.sampling:
        backbone.sampling = sampling
        meta = json.loads((Path(args.out) / "backbone.json").read_text())
        meta["sampling"] = sampling
        write_json(Path(args.out) / "backbone.json", meta)
    write_json(Path(args.out) / "eval.json", report)
    print(f"eval: {json.dumps(report)}", flush=True)
    if args.grid:
        world = world_config(config.world_preset, image_size=config.image_size)
        captions = [eval_caption(s, i) for i, s in enumerate(evaluate.held_out_scenes(world, 16))]
        images = generate_for(backbone, captions, (best["sampler"], best["steps"], best["guidance"]))
        print(f"grid: {sample_grid(images, captions, args.grid)}", flush=True)


if __name__ == "__main__":
    main()
