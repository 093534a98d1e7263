"""Tiny twins of every expensive model, in one place (STYLE.md, "Every expensive part has a tiny twin").

Each builds on the CPU in well under a second (the first diffusers import takes a few), is seeded, and
downloads nothing. The pytest fixtures over them are in conftest.py; a test that mutates its model builds
a fresh one with these functions instead.

- the project's own presets (the `--model tiny-random` a user can run too):
  - `tiny_clip()`       the `tiny-random` CLIP (retrieval.models.clip.TINY_MODEL_CFG: width 32, the real
                        49408-row tokenizer) as a ClipEncoder
  - `tiny_diffusion()`  the `tiny-random` diffusion backbone (retrieval.models.diffusion.TINY_UNET_CFG on
                        the tiny-random CLIP, SpaceToDepth latents)
  - `register_tiny_arch(folder)`  the tiny-random CLIP's config as an open_clip architecture, for the spec
                        forms that name one (`ARCH/PATH`, `ARCH/random`)
- a tiny Stable Diffusion 1.x, diffusers' own parts (their tests' `get_dummy_components()`), to check that
  our loading and conditioning equal diffusers' StableDiffusionPipeline:
  - `tiny_text_model()`            transformers' CLIPTextModel, width 32, as SD 1.x's text encoder
  - `tiny_sd_clip(hf)`             the open_clip CLIP holding that same text tower (and its config)
  - `tiny_sd_components(hf, tok)`  the pipeline's UNet (4, 8), VAE, DDIM scheduler, with that text encoder
  - `write_clip_tokenizer(folder)` a CLIPTokenizer folder from open_clip's bundled BPE vocabulary
"""

import copy
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tokens.token_file import CustomToken, TokenInfo

WIDTH, LAYERS, HEADS = 32, 2, 2  # the tiny SD text tower: width (= cross-attention dim), blocks, heads

# The open_clip CLIP whose text tower is tiny_text_model()'s: the situation of ViT-L-14-quickgelu/openai
# beside CompVis/stable-diffusion-v1-4. Its vision tower is the smallest
# open_clip builds (nothing here reads it).
TINY_SD_CLIP_CFG: dict[str, Any] = {
    "embed_dim": WIDTH,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": WIDTH, "heads": HEADS, "layers": LAYERS},
}


# ----- the project's presets
def tiny_clip():
    """The `tiny-random` CLIP on the CPU in fp32."""
    from retrieval.models.encoders import ClipEncoder

    return ClipEncoder.from_spec("tiny-random", device="cpu", precision="fp32")


def tiny_diffusion():
    """The `tiny-random` diffusion backbone with its own tiny-random CLIP (fp32, CPU); a fresh one each call."""
    from retrieval.models.diffusion import load_diffusion

    return load_diffusion("tiny-random", device="cpu")


TINY_ARCH = "Tiny-ViT-Test"  # the name register_tiny_arch gives TINY_MODEL_CFG in open_clip's registry


def register_tiny_arch(folder: Path) -> str:
    """Register the tiny-random CLIP's config as the open_clip architecture TINY_ARCH, as open_clip's own tests
    add tiny configs to the registry; writes folder/TINY_ARCH.json and returns the name. The registry is
    global: the name stays known for the rest of the process (harmless, nothing else uses it)."""
    import open_clip

    from retrieval.models.clip import TINY_MODEL_CFG

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TINY_ARCH}.json"
    path.write_text(json.dumps(TINY_MODEL_CFG))
    open_clip.add_model_config(path)
    return TINY_ARCH


# ----- a tiny Stable Diffusion 1.x from diffusers' and transformers' parts
def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    """A transformers CLIPTokenizer folder (vocab.json + merges.txt) built from open_clip's bundled BPE file,
    the same vocabulary OpenAI's tokenizer has; never downloaded. SD 1.x pads with end-of-text, SD 2.x with '!'."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # ids 49406, 49407
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=77)  # as SD's tokenizers


def tiny_text_model(layers: int = LAYERS):
    """transformers' CLIPTextModel as in OpenAI CLIP (quick_gelu), seeded."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config).eval()


def copy_into_open_clip(hf, clip) -> None:
    """Copy a transformers CLIPTextModel's weights into an open_clip CLIP's text tower (its first n blocks)."""
    t = getattr(hf, "text_model", hf)  # transformers 4.x wraps the tower in .text_model, 5.x does not
    with torch.no_grad():
        clip.token_embedding.weight.copy_(t.embeddings.token_embedding.weight)
        clip.positional_embedding.copy_(t.embeddings.position_embedding.weight)
        for layer, block in zip(t.encoder.layers, clip.transformer.resblocks):
            a = layer.self_attn
            block.ln_1.weight.copy_(layer.layer_norm1.weight), block.ln_1.bias.copy_(layer.layer_norm1.bias)
            block.attn.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            block.attn.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            block.attn.out_proj.weight.copy_(a.out_proj.weight), block.attn.out_proj.bias.copy_(a.out_proj.bias)
            block.ln_2.weight.copy_(layer.layer_norm2.weight), block.ln_2.bias.copy_(layer.layer_norm2.bias)
            block.mlp.c_fc.weight.copy_(layer.mlp.fc1.weight), block.mlp.c_fc.bias.copy_(layer.mlp.fc1.bias)
            block.mlp.c_proj.weight.copy_(layer.mlp.fc2.weight), block.mlp.c_proj.bias.copy_(layer.mlp.fc2.bias)
        clip.ln_final.weight.copy_(t.final_layer_norm.weight), clip.ln_final.bias.copy_(t.final_layer_norm.bias)


def tiny_sd_clip(hf) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The open_clip CLIP (TINY_SD_CLIP_CFG) holding hf's text tower, in eval mode, and its config (a copy, to
    save beside it with retrieval.models.clip.save_model_folder)."""
    import open_clip

    cfg = copy.deepcopy(TINY_SD_CLIP_CFG)
    clip = open_clip.model.CLIP(**copy.deepcopy(cfg)).eval()
    copy_into_open_clip(hf, clip)
    return clip, cfg


def tiny_sd_components(text_encoder, tokenizer) -> dict[str, Any]:
    """diffusers' get_dummy_components for StableDiffusionPipeline, with our text encoder and tokenizer."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=WIDTH,
        norm_num_groups=2,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
    )
    return dict(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def make_token(clip, name="my-dress", parent="dress", n=3, seed=0, model=None, vectors=None, feature=None):
    """A custom token of N random (seeded) vectors for CLIP, with a random unit concept feature (GAIR needs one)."""
    g = torch.Generator().manual_seed(seed)
    v = vectors if vectors is not None else torch.randn(n, clip.width, generator=g) * 0.05
    feature = (
        feature
        if feature is not None
        else torch.nn.functional.normalize(torch.randn(clip.dim, generator=g), dim=0).tolist()
    )
    info = TokenInfo(
        name=name,
        model=model or clip.spec,
        width=clip.width,
        n_vectors=v.shape[0],
        parent=parent,
        method="ti",
        concept_feature=list(feature),
    )
    return CustomToken(v, info)


def write_gallery(root: Path, n: int, seed: int = 0, size: int = 48, subdirs: int = 3) -> list[str]:
    """Write N distinct random-colour images (jpg and png, in a few sub-folders); returns their relative paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        rel = Path(f"d{i % subdirs}") / f"img{i:04d}.{'png' if i % 2 else 'jpg'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, 3)
        noise = rng.integers(-40, 40, (size, size, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(root / rel)
        paths.append(rel.as_posix())
    return sorted(paths)
