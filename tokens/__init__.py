"""Custom tokens for vision-language models (Perera et al. 2025; textual inversion; prompt tuning; BaTex).

From a few images of a concept and a parent word ("dress") the package learns a token `*` (placeholder <name>) of
n input-embedding vectors of a CLIP text tower that (a) generates the concept through a diffusion model conditioned
on that same CLIP, (b) tells the concept apart from its parent and other concepts in CLIP space, and (c) composes
with words, for retrieval and generation alike. Methods: `ours` (diffusion + classification loss, token restricted
to an attribute subspace), `ti` (textual inversion), `pt` (prompt tuning), `batex` (coefficients over a
vocabulary basis). Only the token's vectors train: the CLIP (its embedding table included) and the UNet are frozen.

| module         | what it defines                                                                        | tests                   |
| -------------- | -------------------------------------------------------------------------------------- | ----------------------- |
| methods        | TokenTrainConfig and per-method defaults; the math: subspace projection, BaTex basis,  | tests/test_tokens.py    |
|                | balanced BCE; how each method holds its trainable numbers                              |                         |
| attributes     | the attribute vocabulary (colours, materials, patterns, textures, conditions, ...)     | tests/test_tokens.py    |
| initialization | initial vectors: parent word, caption (one vector per token), auto caption             | tests/test_tokens.py    |
| negatives      | reading image folders safely; negatives sampled for the parent prompt, cached          | tests/test_tokens.py    |
| trainer        | prepare_concept (computed once), train_tokens (many concepts, one batched loop)        | tests/test_tokens.py    |
| token_file     | the safetensors token file diffusers loads, with its metadata                          | tests/test_tokens.py    |
| store          | TokenStore: a folder of tokens (list, show, delete, overwrite rules)                   | tests/test_tokens.py    |
| learn          | learn_token: folder of images -> stored token (the `learn-token` command)              | tests/test_tokens.py    |
| generate       | generate_images: a prompt with tokens -> grid of images (the `generate` command)       | tests/test_tokens.py    |

Measured by benchmarks/token_quality.py (toy world: AUCs, generation accuracy, seconds per step).
"""

__all__: list[str] = []

from tokens.generate import GenerateRequest, GenerateResult, generate_images
from tokens.initialization import Initialization, initialize
from tokens.learn import DEFAULT_TOKEN_MODEL, DEFAULT_TOKENS_DIR, LearnRequest, LearnResult, learn_token
from tokens.methods import (
    METHOD_DEFAULTS,
    METHODS,
    TokenTrainConfig,
    balanced_bce,
    nearest_vocabulary_basis,
    pca_basis,
    project_to_subspace,
    token_train_config,
)
from tokens.negatives import sampled_negatives
from tokens.store import TokenExistsError, TokenNotFoundError, TokenStore
from tokens.token_file import CustomToken, TokenFileError, TokenInfo, TokenModelMismatch, load_token_file, save_token_file
from tokens.trainer import ConceptData, TrainedToken, evaluate_losses, prepare_concept, to_custom_token, train_tokens

__all__ += [
    "ConceptData", "CustomToken", "DEFAULT_TOKEN_MODEL", "DEFAULT_TOKENS_DIR", "GenerateRequest", "GenerateResult",
    "Initialization", "LearnRequest", "LearnResult", "METHODS", "METHOD_DEFAULTS", "TokenExistsError", "TokenFileError",
    "TokenInfo", "TokenModelMismatch", "TokenNotFoundError", "TokenStore", "TokenTrainConfig", "TrainedToken",
    "balanced_bce", "evaluate_losses", "generate_images", "initialize", "learn_token", "load_token_file",
    "nearest_vocabulary_basis", "pca_basis", "prepare_concept", "project_to_subspace",
    "sampled_negatives", "save_token_file", "to_custom_token", "token_train_config", "train_tokens",
]
