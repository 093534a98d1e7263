"""Train the toy world's text-to-image diffusion model, conditioned on the toy world's CLIP.

It plays Stable Diffusion's part in the toy world: custom tokens are trained through it (Perera et al.'s l_SD)
and GAIR generates with it. Like SD 1.x it is a `UNet2DConditionModel` attending to the per-position final
hidden states of a FROZEN CLIP text tower (all 77 positions, padded with end-of-text), trained with the LDM
loss (DDPM forward process, Ho et al. 2020; Rombach et al. 2022; v-prediction, Salimans & Ho 2022, as SD 2.x)
and caption dropout for classifier-free guidance (Ho & Salimans 2022). Its "latents" are the 64 px images themselves rearranged by SpaceToDepth into
32x32x12 (lossless; no VAE to train). CPU budget (ENVIRONMENT.md): channels (32, 64, 128), cross-attention only
at the lowest (8x8) level; attention at 32x32 would cost 10x. It samples with Euler ancestral, 25 steps,
guidance 4 (the `sampling` field: measured best of five samplers).

Pairs are rendered on the fly (one batch ~30 ms), never stored. The (context, category, colour) triples of the
evaluation scenes are held out of training, so the evaluation prompts are compositions the model never saw.

    python -m benchmarks.world.train_diffusion --preset toyworld

writes retrieval/models/weights/toyworld/diffusion/ (what `load_diffusion("toyworld")` loads): unet/ (fp16),
scheduler/, backbone.json (with this config), train_log.json and eval.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.world import evaluate
from benchmarks.world.captions import CAPTION_TEMPLATES, CONTEXT_WORDS, POSE_WORDS, caption, garment_phrase
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
    # ----- model: UNet2DConditionModel on SpaceToDepth latents
    codec_factor: int = 2  # SpaceToDepth block: 64x64x3 px -> 32x32x12 latents
    block_out_channels: tuple[int, ...] = (32, 64, 128)  # channels per resolution level (32, 16, 8 for 64 px)
    layers_per_block: int = 1  # resnet (+ attention) layers per level (2: 5.7 M params, 1.5x the time)
    attention_levels: int = 1  # cross-attention only in the lowest N levels (CPU cost)
    attention_heads: int = 8  # heads of each attention layer (diffusers' attention_head_dim)
    # ----- diffusion (DDPM forward process)
    num_train_timesteps: int = 1000  # T (Ho et al. 2020)
    beta_schedule: str = "squaredcos_cap_v2"  # cosine (Nichol & Dhariwal 2021): better than linear for pixel-scale data
    prediction_type: str = (
        "v_prediction"  # what the UNet predicts: epsilon (SD 1.x), v_prediction (SD 2.x 768) or sample.
    )
    # v: with the cosine schedule's ~zero terminal SNR, epsilon's x0 estimate
    # at high noise is eps error / sqrt(abar) (measured: worse than the mean image)
    # ----- optimisation: AdamW, linear warmup then cosine decay to 0
    steps: int = 1500  # optimizer steps (37 min at 1.47 s/step on 2 CPU cores)
    batch_size: int = 64  # pairs per step
    lr: float = 1e-3  # peak learning rate
    warmup: int = 100  # linear warmup steps
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm; 0: none
    ema_decay: float = 0.995  # EMA of the weights (saved and evaluated); 0: none. Warmed up as (1+n)/(10+n)
    # ----- logging and evaluation
    log_every: int = 25  # steps between training-log entries
    checkpoint_every: int = 200  # steps between UNet state_dict checkpoints (with `checkpoint_dir`); 0: none
    eval_scenes: int = 200  # held-out scenes: their captions are generated and classified
    # ----- sampling (saved in backbone.json: what load_diffusion uses unless a caller overrides it)
    # Euler ancestral, 25 steps, guidance 4. Measured on the committed model, 100 held-out captions (generated
    # context / colour): euler-a 25 g4 1.00 / 0.81; g3 1.00 / 0.76; g5 0.98 / 0.80; g2 1.00 / 0.61; 15 steps g3
    # 1.00 / 0.68; DDIM 25 g3 0.88 / 0.50 (g5 0.41 / 0.39); DDIM 50 g3 0.77 / 0.49; DPM++ 20 g3 0.98 / 0.62; DDPM 100
    # g4 1.00 / 0.73 at 4x the time. The deterministic samplers keep the small model's errors; fresh noise each step
    # washes them out.
    sampling: tuple[str, int, float] = ("euler-a", 25, 4.0)
    # (sampler, steps, guidance scale) settings compared at the end (~7 min on 200 captions): the default above, and
    # DDIM 25 at guidance 3 and DDPM 100 at guidance 2, the previous defaults
    eval_samplers: tuple[tuple[str, int, float], ...] = (("euler-a", 25, 4.0), ("ddim", 25, 3.0), ("ddpm", 100, 2.0))

    def __post_init__(self):
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 1 <= self.attention_levels <= len(self.block_out_channels):
            raise ValueError(
                f"attention_levels must be in [1, {len(self.block_out_channels)}], got {self.attention_levels}"
            )
        latent = self.image_size // self.codec_factor
        if self.image_size % self.codec_factor or latent % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(
                f"image_size {self.image_size} / codec_factor {self.codec_factor} must be divisible by "
                f"2^{len(self.block_out_channels) - 1} (one halving per extra level)"
            )


# Named presets are data. `toyworld`: the committed model (37 min on 2 CPU cores); `smoke`: the test twin.
DIFFUSION_TRAIN_PRESETS: dict[str, dict] = {
    "toyworld": {},
    "smoke": {
        "clip": "tiny-random",
        "image_size": 32,
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "attention_heads": 4,
        "steps": 8,
        "batch_size": 8,
        "lr": 2e-3,
        "warmup": 1,
        "log_every": 1,
        "eval_scenes": 4,
        "sampling": ("ddim", 2, 3.0),
        "eval_samplers": (("ddim", 2, 1.0), ("ddpm", 2, 3.0), ("euler-a", 2, 3.0)),
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
    channels = 3 * config.codec_factor**2
    return {
        "sample_size": config.image_size // config.codec_factor,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": tuple(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": config.attention_heads,
        "norm_num_groups": min(32, config.block_out_channels[0] // 2),
    }


def scheduler_config(config: DiffusionTrainConfig) -> dict:
    # clip_sample: the latents ARE pixels in [-1, 1], so predicted x0 is clipped to that range while sampling
    return {
        "num_train_timesteps": config.num_train_timesteps,
        "beta_schedule": config.beta_schedule,
        "prediction_type": config.prediction_type,
        "clip_sample": True,
    }


def build_backbone(config: DiffusionTrainConfig, clip=None, device: str | torch.device = "auto"):
    """A fresh, seeded DiffusionBackbone: new UNet, DDPM scheduler, SpaceToDepth codec, the frozen CLIP."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from retrieval.models.diffusion import DiffusionBackbone, SpaceToDepthCodec, TextConditioning
    from retrieval.models.encoders import ClipEncoder

    clip = clip or ClipEncoder.from_spec(config.clip, device=str(device), precision="fp32")
    torch.manual_seed(config.seed)
    unet = UNet2DConditionModel(**unet_config(config, clip.width))
    # SD 1.x's convention: pad with end-of-text, final layer
    name, steps, guidance = config.sampling
    return DiffusionBackbone(
        unet,
        DDPMScheduler(**scheduler_config(config)),
        SpaceToDepthCodec(config.codec_factor),
        clip,
        TextConditioning(pad_id=49407, skip_last_layers=0),
        device=device,
        sampling={"sampler": name, "steps": steps, "guidance_scale": guidance},
    )


# ----------------------------------------------------------------------------------------------- data
def triple(scene) -> tuple[str, str, str]:
    return scene.context, scene.category, scene.colour


def eval_caption(scene, index: int = 0) -> str:
    """The full training-grammar caption of a scene: 'a person wearing a red striped dress standing on a beach.'"""
    places = CONTEXT_WORDS[scene.context].places
    return CAPTION_TEMPLATES[0][0].format(
        g=garment_phrase(scene.category, scene.colour, scene.pattern),
        pose=POSE_WORDS[scene.pose].ing,
        place=places[index % len(places)],
    )


def sample_batch(rng: np.random.Generator, world: WorldConfig, n: int, held_out: set) -> tuple[list, list[str]]:
    """N training pairs rendered now: (PIL images, captions). `sample_training_pair`'s two steps, with scenes of
    held-out (context, category, colour) triples redrawn."""
    images, captions = [], []
    while len(images) < n:
        scene = sample_scene(rng, world)
        if triple(scene) in held_out:
            continue
        images.append(render_scene(scene, world))
        captions.append(caption(scene, rng))
    return images, captions


# ----------------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    backbone: object  # DiffusionBackbone holding the trained (EMA) UNet, eval mode
    log: list[dict]  # training-log entries
    seconds: float  # wall time of the loop
    seconds_per_step: float  # mean wall time of one step


def train_diffusion(
    config: DiffusionTrainConfig,
    clip=None,
    device: str = "auto",
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
) -> TrainResult:
    """Train the UNet (text encoder frozen) on pairs rendered on the fly; the loop below is the whole recipe."""
    from tqdm import tqdm

    from retrieval.models.diffusion import pil_to_pixels

    world = world_config(config.world_preset, image_size=config.image_size)

    # 1. parts: a fresh UNet on the frozen CLIP; the EMA copy is what gets saved
    backbone = build_backbone(config, clip, device)
    unet = backbone.unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False) if config.ema_decay else None
    n_params = sum(p.numel() for p in unet.parameters())

    # 2. data streams: pairs, caption dropout, noise and timesteps each from their own seeded generator
    rng = np.random.default_rng([config.seed, STREAM])
    held_out = {triple(s) for s in evaluate.held_out_scenes(world, config.eval_scenes)}
    noise_gen = torch.Generator().manual_seed(config.seed)

    # 3. optimizer
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    # 4. the loop
    log: list[dict] = [{"params": n_params, "held_out_triples": len(held_out), "device": str(backbone.device)}]
    t_loop = time.time()
    bar = tqdm(range(config.steps), disable=not progress, desc="train diffusion")
    for step in bar:
        # 4.1 batch: render, drop captions to "" (classifier-free guidance), encode text with the frozen CLIP
        images, captions = sample_batch(rng, world, config.batch_size, held_out)
        captions = ["" if u < config.caption_dropout else c for u, c in zip(rng.random(len(captions)), captions)]
        latents = backbone.encode_images(pil_to_pixels(images))  # (B, 12, 32, 32)
        with torch.no_grad():
            cond = backbone.conditioning(captions)  # (B, 77, width)
        # 4.2 learning rate
        lr = warmup_cosine_lr(step, config.lr, config.warmup, config.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # 4.3 the LDM loss at random timesteps, backward, clip, step
        loss = backbone.training_loss(latents, cond, noise_gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip or float("inf"))
        optimizer.step()
        # 4.4 EMA of the weights
        if ema is not None:
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), unet.parameters()):
                    p_ema.lerp_(p, 1 - decay)
        # 4.5 log, and a checkpoint of the (EMA) weights to look at while training runs
        if checkpoint_dir and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            torch.save((ema or unet).state_dict(), Path(checkpoint_dir) / f"unet-{step + 1:06d}.pt")
        elapsed = time.time() - t_loop
        bar.set_postfix(loss=f"{loss.item():.4f}", s_step=f"{elapsed / (step + 1):.2f}")
        if step % config.log_every == 0 or step == config.steps - 1:
            log.append(
                {
                    "step": step,
                    "loss": round(loss.item(), 5),
                    "lr": lr,
                    "grad_norm": round(float(grad_norm), 4),
                    "elapsed_s": round(elapsed, 1),
                }
            )
            if not progress:
                print(json.dumps(log[-1]), flush=True)
    seconds = time.time() - t_loop

    # 5. the trained backbone holds the EMA weights
    if ema is not None:
        unet.load_state_dict(ema.state_dict())
    unet.eval().requires_grad_(False)
    return TrainResult(backbone=backbone, log=log, seconds=seconds, seconds_per_step=seconds / max(1, config.steps))


# ----------------------------------------------------------------------------------------------- evaluation
def generate_for(backbone, captions: list[str], setting: tuple[str, int, float], batch_size: int = 50) -> list:
    """One image per caption with a (sampler, steps, guidance) setting; image i uses seed i, whatever the batch."""
    from retrieval.models.diffusion import make_sampler

    name, steps, guidance = setting
    backbone.sample_scheduler = make_sampler(name, backbone.scheduler.config)
    return backbone.generate(captions, guidance_scale=guidance, steps=steps, seed=0, batch_size=batch_size)


def evaluate_generation(backbone, config: DiffusionTrainConfig) -> dict:
    """Generate one image per held-out scene caption with each (sampler, steps, guidance) setting of the config
    and report how often the toy world's CLIP reads the intended context, category, colour and pattern from it;
    beside the same CLIP's accuracy on the real renders of those scenes (the ceiling)."""
    world = world_config(config.world_preset, image_size=config.image_size)
    scenes = evaluate.held_out_scenes(world, config.eval_scenes)
    captions = [eval_caption(s, i) for i, s in enumerate(scenes)]
    report = {
        "scenes": len(scenes),
        "held_out_seed": evaluate.HELD_OUT_SEED,
        "held_out_triples": "the (context, category, colour) triples of these scenes never occur in training",
        "caption_examples": captions[:3],
        "real_images": evaluate.zero_shot_report(backbone.clip, evaluate.render_scenes(scenes, world), scenes, world),
        "generated": [],
    }
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
        key=lambda r: r["accuracy"]["context"] + r["accuracy"]["colour"] + r["accuracy"]["category"],
    )
    report["best"] = {k: best[k] for k in ("sampler", "steps", "guidance")}
    return report


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
        "--checkpoint-dir", help="folder for UNet checkpoints every checkpoint_every steps (none if absent)"
    )
    parser.add_argument("--eval-only", action="store_true", help="skip training: evaluate the model already in --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed), ("clip", args.clip)) if v is not None}
    config = diffusion_train_config(args.preset, **overrides)
    print(f"training {args.preset}: {json.dumps(asdict(config))}", flush=True)

    # 1. train, save (weights, config, log)
    if not args.eval_only:
        result = train_diffusion(
            config, device=args.device, progress=not args.no_progress, checkpoint_dir=args.checkpoint_dir
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

    # 2. evaluate the saved model through the loading path users take; a grid of the best setting's images
    backbone = load_diffusion(args.out, device=args.device)
    report = evaluate_generation(backbone, config)
    write_json(Path(args.out) / "eval.json", report)
    print(f"eval: {json.dumps(report)}", flush=True)
    if args.grid:
        world = world_config(config.world_preset, image_size=config.image_size)
        captions = [eval_caption(s, i) for i, s in enumerate(evaluate.held_out_scenes(world, 16))]
        best = report["best"]
        images = generate_for(backbone, captions, (best["sampler"], best["steps"], best["guidance"]))
        print(f"grid: {sample_grid(images, captions, args.grid)}", flush=True)


if __name__ == "__main__":
    main()
