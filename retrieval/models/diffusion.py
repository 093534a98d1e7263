"""The diffusion backbone: a UNet, its noise schedulers, a latent codec and OUR CLIP text encoder.

One text encoder serves retrieval and generation (Perera et al.): the `ClipEncoder` that embeds gallery
queries is the one whose per-position hidden states condition the UNet, so a custom token's vectors are
trained once and used by both. The parts are passed in (diffusers style); `load_diffusion(SPEC)` builds them:

- a diffusers repo id (``CompVis/stable-diffusion-v1-4``, the paper's, the default) or a preset naming one
  (``sd14``, ``sd15``, ``sd21``, ...): UNet, scheduler and VAE from the hub (cached / HF_HUB_OFFLINE=1),
  with the open_clip model that IS that family's text encoder (``DIFFUSION_PRESETS``);
- a local diffusers folder (``unet/``, ``scheduler/``, ``vae/``, as ``save_pretrained`` writes): its
  ``tokenizer/`` and ``text_encoder/`` configs give the padding id and the hidden-state layer;
- a folder written by `save_diffusion_folder` (``backbone.json`` beside ``unet/`` and ``scheduler/``);
- ``toyworld`` (the committed world model) or ``tiny-random`` (a seeded tiny UNet for smoke tests).

Conditioning conventions (ENVIRONMENT.md): SD 1.x pads prompts with end-of-text (49407) and uses the final
layer; SD 2.x pads with ``!`` (id 0, diffusers#2201) and uses the penultimate layer (then ``ln_final``).
Images: pixels in [-1, 1] go in (diffusers' convention), images in [0, 1] come out of `sample`.
"""

from __future__ import annotations

import copy
import inspect
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from retrieval.io.atomic import replace_dir
from retrieval.models.clip import TOYWORLD_WEIGHTS, ModelLoadError
from retrieval.models.encoders import ClipEncoder
from retrieval.models.precision import DTYPES, autocast, resolve_device, resolve_precision

FORMAT_VERSION = 1
DEFAULT_DIFFUSION = "CompVis/stable-diffusion-v1-4"
DEFAULT_SAMPLING = {"sampler": "ddim", "steps": 50, "guidance_scale": 7.5}  # StableDiffusionPipeline's defaults
# Sampling schedulers by name, each built from the model's training-scheduler config: ddim (deterministic, Song et al.
# 2021), ddpm (ancestral, Ho et al. 2020), euler-a (Euler ancestral, Karras et al. 2022's sigma parametrisation with
# fresh noise each step) and dpm++ (DPM-Solver++ 2M, Lu et al. 2022).
SAMPLERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}
TOYWORLD_FOLDER = TOYWORLD_WEIGHTS / "diffusion"


class DiffusionLoadError(ModelLoadError):
    """A diffusion SPEC that cannot be loaded, or parts that do not fit together; the message says the fix."""


def make_sampler(name: str, scheduler_config: Mapping[str, Any]):
    """A sampling scheduler (see SAMPLERS) from a training scheduler's config (same betas, prediction type)."""
    import diffusers

    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    return getattr(diffusers, SAMPLERS[name]).from_config(scheduler_config)


@dataclass(frozen=True)
class TextConditioning:
    """How prompts become the UNet's cross-attention input."""

    pad_id: int = 49407  # id filling positions after end-of-text: SD 1.x 49407, SD 2.x 0
    skip_last_layers: int = 0  # text blocks skipped before ln_final: SD 1.x 0, SD 2.x 1 (penultimate)


# ----- presets are data: each Stable Diffusion family with the open_clip text tower that IS its text encoder
SD1_TEXT = {
    "clip": "ViT-L-14-quickgelu/openai",  # OpenAI CLIP ViT-L/14 (a fact of SD 1.x, not a default)
    "pad_id": 49407,
    "skip_last_layers": 0,
}
SD2_TEXT = {"clip": "ViT-H-14/laion2b_s32b_b79k", "pad_id": 0, "skip_last_layers": 1}

# A seeded tiny UNet on the tiny-random CLIP (width 32): 32 px images -> 16x16x12 SpaceToDepth latents.
TINY_UNET_CFG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 12,
    "out_channels": 12,
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
# Pixel-space-like latents: the cosine schedule (Nichol & Dhariwal 2021) and x0 clipped to the pixel range.
PIXEL_SCHEDULER_CFG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
}

DIFFUSION_PRESETS: dict[str, dict[str, Any]] = {
    "sd14": {"repo": "CompVis/stable-diffusion-v1-4", **SD1_TEXT},
    "sd15": {"repo": "stable-diffusion-v1-5/stable-diffusion-v1-5", **SD1_TEXT},
    "sd15-runwayml": {"repo": "runwayml/stable-diffusion-v1-5", **SD1_TEXT},
    "sd21": {"repo": "stabilityai/stable-diffusion-2-1", **SD2_TEXT},
    "sd21-base": {"repo": "stabilityai/stable-diffusion-2-1-base", **SD2_TEXT},
    # its default sampler (Euler ancestral, 25 steps, guidance 4) is in the folder's backbone.json; why: the
    # `sampling` field of benchmarks/world/train_diffusion.py
    "toyworld": {"folder": TOYWORLD_FOLDER, "how": "python -m benchmarks.world.train --preset toyworld-v2"},
    "tiny-random": {
        "unet_cfg": TINY_UNET_CFG,
        "scheduler_cfg": PIXEL_SCHEDULER_CFG,
        "codec": {"kind": "space-to-depth", "factor": 2},
        "clip": "tiny-random",
        "pad_id": 49407,
        "skip_last_layers": 0,
        "seed": 0,
    },
}
# A diffusers text_encoder config -> the family whose CLIP it is: (hidden_size, hidden_act) -> text settings.
TEXT_ENCODER_FAMILIES: dict[tuple[int, str], dict[str, Any]] = {(768, "quick_gelu"): SD1_TEXT, (1024, "gelu"): SD2_TEXT}


# ----- latent codecs: pixels in [-1, 1] <-> what the UNet denoises
class SpaceToDepthCodec:
    """Lossless, weightless: (B, 3, H, W) pixels <-> (B, 3 f^2, H/f, W/f) by pixel_unshuffle(f).

    The toy world's UNet then runs at 32x32 on 64 px images yet keeps every pixel's detail.
    """

    kind = "space-to-depth"

    def __init__(self, factor: int = 2, image_channels: int = 3):
        self.factor = factor  # spatial downsampling = block side
        self.latent_channels = image_channels * factor * factor

    def to(self, device=None, dtype=None) -> "SpaceToDepthCodec":
        return self

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return F.pixel_unshuffle(pixels, self.factor)  # (B, 3 f^2, H/f, W/f)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.factor)  # (B, 3, H, W), in [-1, 1] when the latents are

    def config(self) -> dict:
        return {"kind": self.kind, "factor": self.factor}


class VaeCodec:
    """Stable Diffusion's AutoencoderKL: latents = sample of q(z|x) times the VAE's scaling factor."""

    kind = "vae"

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)  # SD 1.x / 2.x: 0.18215
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = vae.config.latent_channels

    def to(self, device=None, dtype=None) -> "VaeCodec":
        if dtype is not None and dtype != self.vae.dtype:
            self.vae.to(dtype=dtype)
        self.vae.to(device=device)
        return self

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return dist.sample(generator) * self.scaling_factor  # (B, 4, H/8, W/8) for SD

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((latents / self.scaling_factor).to(self.vae.dtype)).sample

    def config(self) -> dict:
        return {"kind": self.kind, "factor": self.factor}


# ----- the backbone
class DiffusionBackbone:
    """UNet + schedulers + codec + our CLIP text side: conditioning, the training loss and guided sampling."""

    def __init__(
        self,
        unet,
        scheduler,
        codec: SpaceToDepthCodec | VaeCodec,
        clip: ClipEncoder,
        text: TextConditioning = TextConditioning(),
        sample_scheduler=None,
        device: str | torch.device = "auto",
        precision: str = "auto",
        spec: str = "",
        sampling: Mapping[str, Any] | None = None,
    ):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.precision = resolve_precision(precision, self.device)  # GPU: bf16/fp16 autocast; CPU: fp32
        self.unet = unet.to(self.device).eval()
        if self.unet.dtype != torch.float32:  # master weights stay fp32; autocast lowers the compute precision
            self.unet.float()
        self.scheduler = scheduler  # training: DDPM forward process (add_noise, targets)
        # default sampler settings of this model (Stable Diffusion's: 50 DDIM steps, guidance 7.5); callers may override
        self.sampling = {**DEFAULT_SAMPLING, **(sampling or {})}
        self.sample_scheduler = sample_scheduler or make_sampler(self.sampling["sampler"], scheduler.config)
        self.codec = codec.to(self.device, dtype=torch.float32)
        self.clip = clip
        self.text = text
        self.spec = spec
        # parts meet here: check that they fit
        cross_dim = unet.config.cross_attention_dim
        if cross_dim != clip.width:
            raise DiffusionLoadError(
                f"UNet cross_attention_dim={cross_dim} but the CLIP text width is {clip.width} ({clip.spec}): the UNet was "
                f"trained on another text encoder. SD 1.x goes with {SD1_TEXT['clip']} (768), SD 2.x with "
                f"{SD2_TEXT['clip']} (1024); pass the matching clip_encoder"
            )
        if unet.config.in_channels != codec.latent_channels:
            raise DiffusionLoadError(
                f"UNet takes {unet.config.in_channels} input channels but the {codec.kind} codec makes "
                f"{codec.latent_channels}: UNet and codec come from different models"
            )
        if scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise DiffusionLoadError(
                f"prediction_type {scheduler.config.prediction_type!r} unsupported: use epsilon, v_prediction or sample"
            )

    @property
    def image_size(self) -> int:
        """Default generated image side, px: the UNet's sample size times the codec's downsampling."""
        size = self.unet.config.sample_size
        return (size if isinstance(size, int) else size[0]) * self.codec.factor

    def autocast(self):
        """Mixed precision on GPU (bf16/fp16 autocast over fp32 weights); nothing on CPU."""
        return autocast(self.device, self.precision)

    # ----- text and images in
    def conditioning(self, texts: Sequence[str], vectors: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, 77, width) float32 per-position hidden states; differentiable with respect to `vectors`."""
        return self.encode_prompts(texts, vectors)[0]

    def encode_prompts(self, texts: Sequence[str], vectors: Mapping[str, torch.Tensor] | None = None):
        """(conditioning (B, 77, width) float32, TokenizedPrompts): the hidden states and where each placeholder sits."""
        with self.autocast():
            hidden, _, tokenized = self.clip.text_features(
                list(texts), vectors, pad_id=self.text.pad_id, skip_last_layers=self.text.skip_last_layers
            )
        return hidden.float().to(self.device), tokenized

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> latents (B, C, H/f, W/f) float32."""
        with self.autocast():
            return self.codec.encode(pixels.to(self.device, torch.float32), generator).float()

    # ----- training
    def training_loss(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """The LDM / textual-inversion loss (Perera et al., l_SD; Rombach et al. eq. 2): MSE between the UNet's
        prediction and its target at one uniform random timestep per row. The target follows the scheduler's
        prediction_type: epsilon (SD 1.x), v (SD 2.x 768 px) or the clean sample.

        `noise` and `timesteps` default to draws from `generator`; the token trainer passes its own so that each
        concept's draws are its own. reduction "mean": one scalar; "none": (B,) each row's mean over its latent."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        B = latents.shape[0]
        gen_device = generator.device if generator is not None else torch.device("cpu")
        # 1. noise and timesteps, drawn on the generator's device so a seed means the same on CPU and GPU
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=gen_device)
        if timesteps is None:
            timesteps = torch.randint(
                0, self.scheduler.config.num_train_timesteps, (B,), generator=generator, device=gen_device
            )
        noise, t = noise.to(latents.device), timesteps.to(latents.device)
        # 2. forward process q(x_t | x_0)
        noisy = self.scheduler.add_noise(latents, noise, t)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":  # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)
            target = self.scheduler.get_velocity(latents, noise, t)
        else:  # "sample": the clean latents themselves
            target = latents
        # 3. prediction and loss
        with self.autocast():
            pred = self.unet(noisy, t, encoder_hidden_states=cond.to(latents.device)).sample
        rows = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)  # (B,)
        return rows.mean() if reduction == "mean" else rows

    # ----- sampling
    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        guidance_scale: float = 7.5,
        steps: int = 50,
        seed: int | Sequence[int] = 0,
        height: int | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        """Classifier-free guided sampling (Ho & Salimans 2022) from conditioning tensors.

        cond (B, L, W); uncond (B, L, W) or (1, L, W), needed unless guidance_scale == 1. Row i draws its noise
        (the initial noise, and each step's noise for a stochastic sampler such as DDPM) from its own CPU
        generator seeded `seed + i` (or `seed[i]`), so its image depends neither on the batch it is in nor on the
        device. The sampler is `self.sample_scheduler` (built from `self.sampling["sampler"]` unless replaced). Returns (B, 3, H, W) float32 in
        [0, 1], on the CPU.
        """
        # 1. check inputs
        B = cond.shape[0]
        seeds = [seed + i for i in range(B)] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != B:
            raise ValueError(f"{len(seeds)} seeds for {B} conditionings")
        do_cfg = guidance_scale != 1.0
        if do_cfg:
            if uncond is None:
                raise ValueError(f"guidance_scale={guidance_scale} needs `uncond` (e.g. conditioning(['']))")
            uncond = uncond.expand(B, -1, -1) if uncond.shape[0] == 1 else uncond
            if uncond.shape != cond.shape:
                raise ValueError(f"uncond {tuple(uncond.shape)} does not match cond {tuple(cond.shape)}")
        height, width = height or self.image_size, width or self.image_size
        f = self.codec.factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        # 2. timesteps (a private copy: the scheduler keeps per-call state)
        scheduler = copy.deepcopy(self.sample_scheduler)
        scheduler.set_timesteps(steps, device=self.device)
        # 3. initial noise, one generator per row (stochastic samplers draw their step noise from them too)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        shape = (1, self.codec.latent_channels, height // f, width // f)
        latents = torch.cat([torch.randn(shape, generator=g) for g in generators])
        latents = latents.to(self.device) * scheduler.init_noise_sigma  # (B, C, h, w)
        step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
        # 4. text embeddings: one UNet call per step on [uncond; cond]
        text = torch.cat([uncond, cond]) if do_cfg else cond
        text = text.to(self.device, torch.float32)
        # 5. denoising loop
        for t in scheduler.timesteps:
            x = torch.cat([latents, latents]) if do_cfg else latents
            x = scheduler.scale_model_input(x, t)
            with self.autocast():
                pred = self.unet(x, t, encoder_hidden_states=text).sample.float()
            if do_cfg:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
            latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
        # 6. decode to [0, 1]
        with self.autocast():
            images = self.codec.decode(latents).float()
        return (images / 2 + 0.5).clamp(0, 1).cpu()

    @torch.no_grad()
    def sample_images(
        self,
        cond: torch.Tensor,
        seeds: Sequence[int],
        guidance_scale: float = 7.5,
        steps: int = 50,
        batch_size: int = 8,
        negative_prompt: str = "",
        on_batch: Callable[[int], Any] | None = None,
    ) -> list[Image.Image]:
        """One PIL image per row of COND (N, L, width), row i seeded SEEDS[i] (`sample`), BATCH_SIZE rows per sampler
        call; ON_BATCH(rows) after each call (a progress bar)."""
        uncond = self.conditioning([negative_prompt]) if guidance_scale != 1.0 else None
        images: list[Image.Image] = []
        for start in range(0, cond.shape[0], batch_size):
            chunk = cond[start : start + batch_size]
            images.extend(
                to_pil(self.sample(chunk, uncond, guidance_scale, steps, list(seeds[start : start + chunk.shape[0]])))
            )
            if on_batch is not None:
                on_batch(chunk.shape[0])
        return images

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        vectors: Mapping[str, torch.Tensor] | None = None,
        n: int = 1,
        negative_prompt: str = "",
        guidance_scale: float = 7.5,
        steps: int = 50,
        seed: int = 0,
        batch_size: int = 8,
    ) -> list[Image.Image]:
        """Prompts (with optional placeholder vectors) -> n PIL images each, prompt-major; image i uses seed + i."""
        rows = [p for p in prompts for _ in range(n)]
        cond = self.conditioning(rows, vectors)
        return self.sample_images(
            cond, range(seed, seed + len(rows)), guidance_scale, steps, batch_size, negative_prompt
        )


# ----- pixels
def pil_to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> (B, 3, H, W) float32 in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images."""
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


# ----- loading
def _hint(spec: str) -> str:
    return (
        f"could not load diffusion weights for {spec!r}. Weights come from the Hugging Face hub on first use; this "
        "machine is offline or they are not cached. Fix: run once where the hub is reachable (they land in "
        "~/.cache/huggingface; then set HF_HUB_OFFLINE=1), or pass a local diffusers folder (unet/, scheduler/, vae/, "
        "as StableDiffusionPipeline.save_pretrained writes). For a download-free smoke test use 'tiny-random'."
    )


def _load_json(get: Callable[[str], str | None], name: str) -> dict | None:
    path = get(name)
    return json.loads(Path(path).read_text()) if path else None


def _pad_id_from_tokenizer(get: Callable[[str], str | None]) -> int | None:
    """The id diffusers' tokenizer pads with: its pad token (special_tokens_map.json first, as transformers
    resolves it; then tokenizer_config.json) looked up in vocab.json or tokenizer.json."""
    pad = None
    for name in ("tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json"):
        cfg = _load_json(get, name) or {}
        pad = cfg.get("pad_token")
        if pad is not None:
            break
    if pad is None:
        return None
    pad = pad["content"] if isinstance(pad, dict) else pad
    vocab = _load_json(get, "tokenizer/vocab.json") or (_load_json(get, "tokenizer/tokenizer.json") or {}).get(
        "model", {}
    ).get("vocab", {})
    if pad not in vocab:
        raise DiffusionLoadError(f"the tokenizer's pad token {pad!r} is not in its vocabulary")
    return int(vocab[pad])


def _diffusers_parts(source: str, spec: str, known: dict | None, clip_encoder: ClipEncoder | None, device):
    """UNet, scheduler, VAE codec, CLIP, text conditioning and sampling settings (None: the defaults) from a
    diffusers layout (local folder or hub repo)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    local = Path(source).is_dir()

    def get(name: str) -> str | None:
        if local:
            return str(Path(source) / name) if (Path(source) / name).is_file() else None
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(source, name)
        except Exception:  # missing file, offline, not cached: treated alike, as absent
            return None

    # 1. the three diffusion parts
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch.float32)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise DiffusionLoadError(f"{_hint(spec)}\n(cause: {str(e).splitlines()[0][:300]})") from e
    # 2. which CLIP is the text encoder, its padding and its layer
    text_cfg = _load_json(get, "text_encoder/config.json")
    if known is None and text_cfg is not None:
        known = TEXT_ENCODER_FAMILIES.get((text_cfg.get("hidden_size"), text_cfg.get("hidden_act")))
    clip = clip_encoder
    if clip is None:
        if known is None:
            raise DiffusionLoadError(
                f"{spec}: its text encoder is not one of the known Stable Diffusion families "
                f"({', '.join(f'{k}' for k in TEXT_ENCODER_FAMILIES)}): pass clip_encoder=ClipEncoder.from_spec(...) "
                "holding the same text tower"
            )
        clip = _load_clip(known["clip"], device)
    pad_id = _pad_id_from_tokenizer(get)
    pad_id = pad_id if pad_id is not None else (known or {}).get("pad_id")
    if text_cfg is not None:
        skip = len(clip.model.transformer.resblocks) - int(text_cfg["num_hidden_layers"])
        if skip < 0:
            raise DiffusionLoadError(
                f"{spec}: its text encoder has {text_cfg['num_hidden_layers']} layers, more than the CLIP "
                f"{clip.spec} ({len(clip.model.transformer.resblocks)}): they are different models"
            )
    else:
        skip = (known or {}).get("skip_last_layers")
    if pad_id is None or skip is None:
        raise DiffusionLoadError(
            f"{spec}: no tokenizer/ or text_encoder/ config to tell the padding id and hidden-state layer, and not a "
            f"known family: use a preset ({', '.join(DIFFUSION_PRESETS)}) or a folder with those configs"
        )
    return unet, scheduler, VaeCodec(vae), clip, TextConditioning(pad_id=pad_id, skip_last_layers=skip), None


def _load_clip(spec: str, device) -> ClipEncoder:
    # fp32 weights everywhere; the backbone's autocast gives mixed precision on GPU (token training needs fp32 grads)
    try:
        return ClipEncoder.from_spec(spec, device=str(device), precision="fp32")
    except ModelLoadError as e:
        raise DiffusionLoadError(f"the diffusion model's text encoder (CLIP {spec!r}) cannot be loaded: {e}") from e


def _folder_parts(folder: Path, spec: str, clip_encoder: ClipEncoder | None, device):
    """Parts from a folder written by save_diffusion_folder, with its saved sampling settings."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    meta = json.loads((folder / "backbone.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise DiffusionLoadError(
            f"{folder}/backbone.json has format_version {meta.get('format_version')}, this code reads {FORMAT_VERSION}: "
            "re-save it with this version's save_diffusion_folder"
        )
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32, low_cpu_mem_usage=False)
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    codec_cfg = meta["codec"]
    if codec_cfg["kind"] == SpaceToDepthCodec.kind:
        codec = SpaceToDepthCodec(codec_cfg["factor"])
    elif codec_cfg["kind"] == VaeCodec.kind:
        codec = VaeCodec(
            AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32, low_cpu_mem_usage=False)
        )
    else:
        raise DiffusionLoadError(f"{folder}: unknown codec kind {codec_cfg['kind']!r}")
    clip = clip_encoder or _load_clip(meta["clip"], device)
    if meta.get("clip_fingerprint") and text_fingerprint(clip) != meta["clip_fingerprint"]:
        raise DiffusionLoadError(
            f"{folder}: the UNet was trained on another text tower than the CLIP {clip.spec!r} now holds (fingerprint "
            f"{text_fingerprint(clip)} != {meta['clip_fingerprint']}): the CLIP was retrained or replaced. Retrain the "
            f"diffusion model on it ({meta.get('training', {}).get('command', 'see backbone.json')}) or restore that CLIP"
        )
    text = TextConditioning(**meta["text"])
    return unet, scheduler, codec, clip, text, meta.get("sampling")


def load_diffusion(
    spec: str = DEFAULT_DIFFUSION,
    clip_encoder: ClipEncoder | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> DiffusionBackbone:
    """SPEC (see module docstring) -> DiffusionBackbone. `clip_encoder` replaces the CLIP the SPEC names (it
    must hold the same text tower). Errors are DiffusionLoadError with the fix."""
    dev = resolve_device(device)
    preset = DIFFUSION_PRESETS.get(spec)
    # 1. resolve the spec to one of: built tiny model, our folder, a diffusers layout (folder or hub)
    if preset is not None and "unet_cfg" in preset:
        from diffusers import DDPMScheduler, UNet2DConditionModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(preset["seed"])
            unet = UNet2DConditionModel(**preset["unet_cfg"])
        parts = (
            unet,
            DDPMScheduler(**preset["scheduler_cfg"]),
            SpaceToDepthCodec(preset["codec"]["factor"]),
            clip_encoder or _load_clip(preset["clip"], dev),
            TextConditioning(preset["pad_id"], preset["skip_last_layers"]),
            None,
        )
    elif preset is not None and "folder" in preset:
        folder = Path(preset["folder"])
        if not (folder / "backbone.json").is_file():
            raise DiffusionLoadError(
                f"the {spec!r} diffusion model is not at {folder}: build it with `{preset['how']}`"
            )
        parts = _folder_parts(folder, spec, clip_encoder, dev)
    elif preset is not None:
        parts = _diffusers_parts(preset["repo"], spec, preset, clip_encoder, dev)
    elif Path(spec).is_dir():
        folder = Path(spec)
        if (folder / "backbone.json").is_file():
            parts = _folder_parts(folder, spec, clip_encoder, dev)
        elif (folder / "unet").is_dir():
            parts = _diffusers_parts(str(folder), spec, None, clip_encoder, dev)
        else:
            raise DiffusionLoadError(
                f"{folder} is neither a diffusers folder (unet/, scheduler/, vae/) nor a saved backbone (backbone.json)"
            )
    elif spec.count("/") == 1 and not spec.startswith((".", "/")):
        known = next((p for p in DIFFUSION_PRESETS.values() if p.get("repo") == spec), None)
        parts = _diffusers_parts(spec, spec, known, clip_encoder, dev)
    else:
        raise DiffusionLoadError(
            f"unknown diffusion model {spec!r}: give a hub repo id (e.g. {DEFAULT_DIFFUSION}), a local diffusers "
            f"folder, or a preset ({', '.join(DIFFUSION_PRESETS)})"
        )
    # 2. assemble (checks that the parts fit)
    # a saved backbone carries its sampler settings; the others (sampling None) sample as Stable Diffusion does
    unet, scheduler, codec, clip, text, sampling = parts
    return DiffusionBackbone(
        unet, scheduler, codec, clip, text, device=dev, precision=precision, spec=spec, sampling=sampling
    )


# ----- saving
def text_fingerprint(clip: ClipEncoder) -> str:
    """sha256 (16 hex digits) of the text tower's weights (rounded to fp16): a saved UNet names the exact
    text encoder it was trained on, so a retrained CLIP behind the same spec is caught at load time."""
    import hashlib

    m = clip.model
    digest = hashlib.sha256()
    for name, tensor in sorted(m.state_dict().items()):
        if name.startswith(("token_embedding", "positional_embedding", "transformer.", "ln_final")):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float16).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_diffusion_folder(
    backbone: DiffusionBackbone,
    folder: str | Path,
    extra_config: dict | None = None,
    extra_files: Mapping[str, Any] | None = None,
    unet_dtype: str = "fp16",
) -> Path:
    """Write BACKBONE as a folder that `load_diffusion(folder)` loads: unet/ (config + safetensors in
    `unet_dtype`), scheduler/, vae/ (VAE codec only, also in `unet_dtype`), backbone.json (codec, CLIP spec, text conditioning,
    format version, `extra_config` e.g. the training config) and `extra_files` (name -> JSON-able object).
    Written to a temporary folder, then renamed: a crash leaves no half-written model."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "unet").mkdir(parents=True)

    # 1. UNet and VAE: diffusers' config + weights in the chosen dtype (diffusers' from_pretrained reads them back)
    def save_model(model, name: str) -> None:
        (tmp / name).mkdir(parents=True, exist_ok=True)
        model.save_config(tmp / name)
        state = {k: v.detach().to("cpu", DTYPES[unet_dtype]).contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / name / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})

    save_model(backbone.unet, "unet")
    if isinstance(backbone.codec, VaeCodec):
        save_model(backbone.codec.vae, "vae")
    # 2. schedulers
    backbone.scheduler.save_pretrained(tmp / "scheduler")
    # 3. what the folder is
    meta = {
        "format_version": FORMAT_VERSION,
        "codec": backbone.codec.config(),
        "clip": backbone.clip.spec,
        "clip_width": backbone.clip.width,
        "clip_fingerprint": text_fingerprint(backbone.clip),
        "text": asdict(backbone.text),
        "unet_dtype": unet_dtype,
        "sampling": backbone.sampling,
        "training": extra_config or {},
    }
    (tmp / "backbone.json").write_text(json.dumps(meta, indent=2, default=str))
    for name, obj in (extra_files or {}).items():
        (tmp / name).write_text(json.dumps(obj, indent=2, default=str))
    # 4. swap in
    return replace_dir(tmp, folder)
