"""Custom tokens for vision-language models (Perera et al., BaTex, multi-vector tokens).

Not implemented yet: this package is built by the custom-token issue (#4). Until then it exports nothing,
and no command uses it.
"""
