"""Models, the second layer: the CLIP factory and encoder, the diffusion backbone, and which diffusion model
pairs with which CLIP. Builds on `retrieval.io` only.
"""
