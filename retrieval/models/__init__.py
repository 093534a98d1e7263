"""Models, the second layer: the CLIP factory and encoder, the diffusion backbone, and which diffusion model
pairs with which CLIP. Builds on `retrieval.io` only.
"""

DEFAULT_MODEL = "ViT-L-14-quickgelu/openai"  # the text tower of Stable Diffusion 1.x (ENVIRONMENT.md), the paper's CLIP
