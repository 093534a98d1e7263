"""Shared I/O, the bottom layer: atomic file and folder writes, safe image decoding, image-folder caches.

Nothing here knows about models, indexes or tokens; every other layer builds on it.
"""
