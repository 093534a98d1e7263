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
| token_file     | the safetensors token file diffusers loads, with its metadata; the placeholder syntax  | tests/test_tokens.py    |
|                | (`<name>`, `*`: STAR, PLACEHOLDER_PATTERN, placeholder_names)                          |                         |
| store          | TokenStore: a folder of tokens (list, show, delete, overwrite rules)                   | tests/test_tokens.py    |
| learn          | learn_tokens: concepts' images -> tokens (the one learning sequence, batched);         | tests/test_tokens.py    |
|                | learn_token: folder of images -> stored token (the `learn-token` command)              |                         |

Measured by benchmarks/token_quality.py (toy world: AUCs, generation accuracy, seconds per step).

The names below are imported on first use (`retrieval.io.lazy`): `import tokens.defaults` and the CLI's
`--help` load no model code.
"""

from retrieval.io.lazy import lazy_exports

_EXPORTS = {
    "ConceptData": "tokens.trainer",
    "ConceptImages": "tokens.learn",
    "CustomToken": "tokens.token_file",
    "DEFAULT_TOKENS_DIR": "tokens.defaults",
    "Initialization": "tokens.initialization",
    "LearnRequest": "tokens.learn",
    "LearnResult": "tokens.learn",
    "METHODS": "tokens.methods",
    "METHOD_DEFAULTS": "tokens.methods",
    "NAME_PATTERN": "tokens.token_file",
    "PLACEHOLDER_PATTERN": "tokens.token_file",
    "STAR": "tokens.token_file",
    "TokenExistsError": "tokens.store",
    "TokenFileError": "tokens.token_file",
    "TokenInfo": "tokens.token_file",
    "TokenModelMismatch": "tokens.token_file",
    "TokenNotFoundError": "tokens.store",
    "TokenStore": "tokens.store",
    "TokenTrainConfig": "tokens.methods",
    "StepReport": "tokens.trainer",
    "TrainedToken": "tokens.trainer",
    "TrainingCancelled": "tokens.trainer",
    "balanced_bce": "tokens.methods",
    "evaluate_losses": "tokens.trainer",
    "initialize": "tokens.initialization",
    "learn_token": "tokens.learn",
    "learn_tokens": "tokens.learn",
    "load_token_file": "tokens.token_file",
    "nearest_vocabulary_basis": "tokens.methods",
    "needs_diffusion": "tokens.learn",
    "pca_basis": "tokens.methods",
    "placeholder_names": "tokens.token_file",
    "prepare_concept": "tokens.trainer",
    "project_to_subspace": "tokens.methods",
    "sampled_negatives": "tokens.negatives",
    "save_token_file": "tokens.token_file",
    "to_custom_token": "tokens.trainer",
    "token_train_config": "tokens.methods",
    "train_tokens": "tokens.trainer",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
