"""The engine: one object that opens an index folder and a token folder, loads the paired models once, and offers
every operation: index a gallery, learn a custom token, query (words, custom tokens, GAIR), generate, report.

The CLI, the demo, the benchmarks and notebooks are thin callers of it (STYLE.md 14): like a diffusers pipeline,
it holds its parts (CLIP, diffusion backbone, index, token store) and takes them in its constructor when the caller
already has them (tests hand it tiny ones). Models load on first use, once: the CLIP when something is encoded,
the diffusion model only when something is generated or a method's loss needs it.

    from retrieval import Engine
    engine = Engine("my.index", tokens_dir="my_tokens", model="toyworld")
    engine.index("photos/")
    engine.learn_token("my-dress", images="photos_of_my_dress/", parent="dress", steps=300)
    result = engine.query("a person wearing a * on the grass", tokens=["my-dress"], gair=True)

Errors name Python arguments in backticks (`tokens=[...]`); the CLI says them as its flags.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from indexes.store import IndexStore, IndexStoreError, manifest_version, read_manifest, rebuild_index
from indexes.store import compact as compact_index
from indexes.store import migrate as migrate_index
from indexes.vector_index import IndexConfig
from retrieval.composed import (
    PAPER_ATTRIBUTES,
    ComposedQuery,
    QueryError,
    check_attributes,
    check_query_model,
    composed_feature,
    plan_query,
    truncated,
)
from retrieval.distributed import RayEmbedder, RayTokenLearner, TokenJob
from retrieval.gair import CONTEXT_CACHE_DIR, GairConfig, GairOutcome, run_gair
from retrieval.indexer import IndexingConfig, IndexSummary, index_gallery, is_approximate, tuning_queries
from retrieval.io.atomic import write_atomic
from retrieval.io.images import image_grid, read_image_folder
from retrieval.mix import FILE, GALLERY_ID, TEXT, Term, combine, parse_mix
from retrieval.models.clip import DEFAULT_MODEL
from retrieval.models.diffusion import DiffusionBackbone
from retrieval.models.encoders import ClipEncoder
from retrieval.models.pairing import AUTO, load_clip_encoder, load_paired_diffusion
from retrieval.models.precision import resolve_precision
from retrieval.report import composed_html, results_html, write_html
from retrieval.search import Hit, QueryResult, search_texts, search_vectors
from tokens.learn import (
    DEFAULT_TOKENS_DIR,
    LearnRequest,
    LearnResult,
    concept_folders,
    learn_token,
    learn_token_batch,
    needs_diffusion,
)
from tokens.store import TokenStore
from tokens.token_file import STAR, CustomToken, placeholder_names
from tokens.trainer import StepReport


@dataclass
class ComposedResult:
    """A composed query's answer: the plan, the hits, and GAIR's record when it ran."""

    query: str  # as written
    composed: str  # [t, *, c] as encoded
    model: str
    hits: list[Hit]
    tokens: tuple[str, ...]
    attributes: tuple[str, ...]
    truncated: bool = False
    gair: GairOutcome | None = None

    def to_json(self) -> dict:
        out = {
            "query": self.query,
            "composed": self.composed,
            "model": self.model,
            "tokens": list(self.tokens),
            "results": [{"rank": h.rank, "score": round(h.score, 6), "path": h.path, "id": h.id} for h in self.hits],
        }
        if self.truncated:
            out["truncated"] = True
        if self.gair is not None:
            out["attributes"] = list(self.attributes)
            out["gair"] = self.gair.to_json()
        return out


@dataclass
class Generated:
    """Images generated for a prompt (`Engine.generate`)."""

    prompt: str  # as encoded: `*` replaced by the placeholder, parent word added
    images: list[Image.Image]
    out: Path | None = None  # the grid written, when asked


@dataclass
class MixResult:
    """A query mix's answer (`Engine.query_mix`): its terms as parsed and the hits of their weighted sum."""

    query: str  # as written ("" when terms were given)
    model: str
    terms: list[Term]
    hits: list[Hit]
    tokens: tuple[str, ...] = ()  # the custom tokens its terms use

    def to_json(self) -> dict:
        out = QueryResult(self.query, self.model, self.hits).to_json()
        return {**out, "tokens": list(self.tokens), "terms": [t.to_json() for t in self.terms]}


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime_ns) of PATH, or None if absent: changes whenever a commit replaces the file atomically."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


TokenRef = str | CustomToken  # a token by its name in the store, or a loaded one


class Engine:
    """The index at INDEX_DIR (None: no index yet, or none needed), the token store at TOKENS_DIR and the models.

    model: the CLIP SPEC; default the index's, else DEFAULT_MODEL. diffusion: the diffusion SPEC ("auto": the one
    paired with the CLIP). clip / backbone: already-loaded parts to use instead of loading (backbone must be
    conditioned on that clip)."""

    def __init__(
        self,
        index_dir: str | Path | None = None,
        tokens_dir: str | Path = DEFAULT_TOKENS_DIR,
        *,
        model: str | None = None,
        diffusion: str = AUTO,
        device: str = "auto",
        clip: ClipEncoder | None = None,
        backbone: DiffusionBackbone | None = None,
    ):
        if backbone is not None:
            if clip is not None and backbone.clip is not clip:
                raise ValueError("`backbone` must be conditioned on the same ClipEncoder object as `clip`")
            clip = backbone.clip
        if clip is not None:
            if model is not None and model != clip.spec:
                raise ValueError(f"`model={model}` but the `clip` given is {clip.spec}")
            model = clip.spec
        self.index_dir = Path(index_dir) if index_dir is not None else None
        manifest = read_manifest(self.index_dir) if self.index_dir is not None else None
        self.model = model or (manifest["model"] if manifest else DEFAULT_MODEL)
        self.diffusion, self.device = diffusion, device
        self.tokens = TokenStore(tokens_dir)
        self.cache_dir = self.tokens.root / CONTEXT_CACHE_DIR  # GAIR's context images
        self._clip, self._backbone, self._store, self._store_stamp = clip, backbone, None, None
        if manifest is not None:
            self.store.check_model(self.model)  # refuse before a possibly large model loads

    # ----- the parts, loaded once on first use
    @property
    def clip(self) -> ClipEncoder:
        if self._clip is None:
            self._clip = load_clip_encoder(self.model, self.device)
        return self._clip

    @property
    def backbone(self) -> DiffusionBackbone:
        if self._backbone is None:
            self._backbone = load_paired_diffusion(self.clip, self.diffusion, self.device)
        return self._backbone

    @property
    def store(self) -> IndexStore:
        """The committed index, switched to a newer commit when one has landed since it was opened (by this engine or
        by another process, e.g. `cli.py index` while a server runs): each use sees one whole committed version.
        The check is one stat of manifest.json; the manifest is read again only when that file changed."""
        if self.index_dir is None:
            raise IndexStoreError("this engine has no index: pass `index_dir` to Engine(...)")
        stamp = _stamp(self.index_dir / "manifest.json")
        if self._store is None or stamp != self._store_stamp:
            manifest = read_manifest(self.index_dir)
            if manifest is None:
                raise IndexStoreError(
                    f"no index in {self.index_dir}: index a gallery into `index_dir={self.index_dir}` first"
                )
            if self._store is None or manifest_version(manifest) != self._store.version:
                # the old store's pin is released when the last query still using it lets it go (IndexStore)
                self._store = IndexStore(self.index_dir, manifest=manifest)
            self._store_stamp = stamp
        return self._store

    # ----- indexing
    def index(
        self,
        gallery_dir: str | Path,
        *,
        progress: bool = True,
        wait: bool | float = False,
        engine: str = "local",
        address: str | None = None,
        **options,
    ) -> IndexSummary:
        """Index (or update the index of) GALLERY_DIR into index_dir. OPTIONS: any `IndexingConfig` field but
        model and device (batch_size, workers, shard_size, max_pixels, precision, index=IndexConfig(...)).
        WAIT: when another process is writing the index, wait for it (True, or at most WAIT seconds) instead of
        failing at once with its name. ENGINE: "local" embeds in this process; "ray" on a Ray cluster
        (retrieval.distributed.RayEmbedder: one actor per GPU, else per CPU) at ADDRESS (None: a new local Ray;
        "auto": the cluster `ray start` runs here; "HOST:PORT")."""
        if engine not in ("local", "ray"):
            raise ValueError(f"`engine={engine}` is not one of local, ray")
        if address is not None and engine != "ray":
            raise ValueError(f"`address={address}` is for `engine=ray`: add `engine=ray`, or leave out `address`")
        if self.index_dir is None:
            raise IndexStoreError("this engine has no index folder: pass `index_dir` to Engine(...)")
        allowed = {f.name for f in fields(IndexingConfig)} - {"model", "device"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(
                f"Engine.index() got unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}"
            )
        config = IndexingConfig(model=self.model, device=self.device, **options)
        # the CLIP this engine already holds embeds the gallery when it runs at the indexing precision
        held = self._clip
        encoder = (
            held if held is not None and held.precision == resolve_precision(config.precision, held.device) else None
        )
        if engine == "ray":
            with RayEmbedder(address=address) as embedder:
                summary = index_gallery(
                    gallery_dir, self.index_dir, config, progress=progress, embedder=embedder, wait=wait
                )
        else:
            summary = index_gallery(gallery_dir, self.index_dir, config, progress=progress, encoder=encoder, wait=wait)
        self._store = None
        return summary

    def reindex(self, index_config: IndexConfig, *, wait: bool | float = False) -> dict:
        """Rebuild the FAISS index with another type or tuning from the stored embeddings (all segments into one);
        returns the manifest. WAIT: as for `index`, when another writer holds the index. Approximate segments are
        tuned on this CLIP's text embeddings of generic queries too (retrieval.indexer.tuning_queries)."""
        approximate = is_approximate(self.store.count, self.store.dim, index_config)
        tuning = tuning_queries(self.clip) if approximate else None
        manifest = rebuild_index(self.store.dir, index_config, wait=wait, tuning_queries=tuning)
        self._store = None
        return manifest

    def compact(self, *, full: bool = False, wait: bool | float = False) -> dict | None:
        """Merge the index's segments by size tier (indexes.store.CompactionPolicy; FULL: into one segment),
        dropping deleted rows. Returns the new manifest, or None when nothing needed merging."""
        manifest = compact_index(self.store.dir, full=full, wait=wait)
        self._store = None
        return manifest

    def migrate(self, *, wait: bool | float = False) -> dict:
        """Convert a format 1 index folder to the segmented format 2 in place (no copy: hard links)."""
        if self.index_dir is None:
            raise IndexStoreError("this engine has no index folder: pass `index_dir` to Engine(...)")
        manifest = migrate_index(self.index_dir, wait=wait)
        self._store = None
        return manifest

    # ----- custom tokens
    def learn_token(
        self,
        name: str,
        images: str | Path,
        parent: str,
        *,
        progress: bool = True,
        on_step: Callable[[StepReport], bool | None] | None = None,
        **options,
    ) -> LearnResult:
        """Learn a token from the images in the folder IMAGES and the parent word, and save it in the token store.
        OPTIONS: any `tokens.learn.LearnRequest` field (method, steps, n_vectors, init_caption, negatives, seed,
        overwrite, overrides, context_attributes). ON_STEP(StepReport) after every optimiser step (steps done / total,
        losses, seconds); returning False cancels: `tokens.trainer.TrainingCancelled` is raised, no token is saved."""
        request = self._learn_request(name, images, parent, options, "learn_token")
        backbone = self.backbone if needs_diffusion(request) else None
        return learn_token(request, progress=progress, models=(self.clip, backbone), on_step=on_step)

    def learn_tokens(
        self,
        folder: str | Path,
        parent: str,
        *,
        prefix: str | None = None,
        engine: str = "local",
        address: str | None = None,
        progress: bool = True,
        **options,
    ) -> list[LearnResult]:
        """One token per concept folder of FOLDER (its sub-folders that hold images, `tokens.learn.concept_folders`),
        named PREFIX-<sub-folder> (PREFIX None: the sub-folder's name), all with PARENT and one config (OPTIONS as
        `learn_token`'s), concept i seeded seed + i, learned in one batch and saved; every name is checked before
        anything trains. ENGINE "local": one batched loop in this process; "ray": (concept batch) tasks over the
        workers of the Ray cluster at ADDRESS (None: a new local Ray; retrieval.distributed), the same tokens."""
        if engine not in ("local", "ray"):
            raise ValueError(f"`engine={engine}` is not one of local, ray")
        if address is not None and engine != "ray":
            raise ValueError(f"`address={address}` is for `engine=ray`: add `engine=ray`, or leave out `address`")
        folders = concept_folders(folder)
        if not folders:
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"concept folders: no folder {folder}")
            raise ValueError(
                f"{folder} holds no concept folders (sub-folders with images directly in them); "
                "a folder of one concept's images is for `learn_token`"
            )
        requests = [
            self._learn_request(f"{prefix}-{f.name}" if prefix else f.name, f, parent, options, "learn_tokens")
            for f in folders
        ]
        if engine == "ray":
            learner = RayTokenLearner(self.model, self.diffusion, address=address, device=self.device)

            def on_ray(config, concepts, negatives_dir):
                with learner:
                    return learner([TokenJob(config, concepts)], negatives_dir, progress=progress)[0]

            return learn_token_batch(requests, progress=progress, learner=on_ray)
        backbone = self.backbone if needs_diffusion(requests[0]) else None
        return learn_token_batch(requests, progress=progress, models=(self.clip, backbone))

    def _learn_request(self, name: str, images, parent: str, options: dict, caller: str) -> LearnRequest:
        fixed = {"name", "images", "parent", "model", "diffusion", "tokens_dir", "device"}
        allowed = {f.name for f in fields(LearnRequest)} - fixed
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(
                f"Engine.{caller}() got unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}"
            )
        return LearnRequest(
            name=name,
            images=Path(images),
            parent=parent,
            model=self.model,
            diffusion=self.diffusion,
            tokens_dir=self.tokens.root,
            device=self.device,
            **options,
        )

    def token(self, ref: TokenRef) -> CustomToken:
        """A token by name from the store (checked against this engine's CLIP), or the token given."""
        if isinstance(ref, CustomToken):
            return ref
        return self.tokens.load(ref, model=self.model)

    # ----- queries
    def plan(self, text: str, tokens: Sequence[TokenRef] = ()) -> ComposedQuery:
        """[t, *, c] for TEXT with TOKENS (retrieval.composed.plan_query), tokens checked against the CLIP."""
        plan = plan_query(text, [self.token(t) for t in tokens])
        check_query_model(plan, self.model, self.clip.width)
        return plan

    @staticmethod
    def is_composed(texts: Sequence[str], tokens: Sequence[TokenRef] = (), gair: bool = False) -> bool:
        """Does answering TEXTS need the custom-token path (tokens given, `*` written, or GAIR asked for)?"""
        return bool(tokens) or gair or any(STAR in t for t in texts)

    def check_queries(self, texts: Sequence[str], tokens: Sequence[TokenRef] = (), gair: bool = False) -> None:
        """Every check that needs no model, before any loads: errors (QueryError) say how to write the query."""
        if not texts:
            raise QueryError("no query given: pass at least one text")
        if not tokens:
            stored = [n for t in texts for n in placeholder_names(t) if self.tokens.exists(n)]
            if stored:
                raise QueryError(
                    f"the query names <{stored[0]}>, a token in {self.tokens.root}: add `tokens=[{stored[0]!r}]` to use it"
                )
        if self.is_composed(texts, tokens, gair):
            loaded = [self.token(t) for t in tokens]
            for text in texts:
                plan_query(text, loaded)

    def query(self, text: str, tokens: Sequence[TokenRef] = (), **options) -> QueryResult | ComposedResult:
        """One query (see `query_many`)."""
        return self.query_many([text], tokens, **options)[0]

    def query_many(
        self,
        texts: Sequence[str],
        tokens: Sequence[TokenRef] = (),
        *,
        k: int = 10,
        gair: bool = False,
        attributes: Sequence[str] | None = None,
        gair_config: GairConfig = GairConfig(),
        concept_images: Sequence[Image.Image] | None = None,
        progress: bool = False,
        on_image: Callable[[int, int], None] | None = None,
    ) -> list[QueryResult] | list[ComposedResult]:
        """Answer TEXTS. Words only (no TOKENS, no `*`, no GAIR): plain text search, `QueryResult`s. With custom
        tokens: composed queries (`*` or <name> in the text), `ComposedResult`s; with GAIR (Perera et al.,
        Algorithm 1) the images of every query and weight are generated in batches of `gair_config.batch_size`,
        ON_IMAGE(images done, total) told as they arrive."""
        if k < 1:
            raise ValueError(f"`k={k}`: ask for at least one result")
        tokens = [self.token(t) for t in tokens]  # each token file read once, not once per query
        self.check_queries(texts, tokens, gair)
        if not self.is_composed(texts, tokens, gair):
            return search_texts(self.store, self.clip, list(texts), k)
        plans = [self.plan(t, tokens) for t in texts]
        attrs = [self.attributes_for(p, attributes) if p.tokens else () for p in plans]
        outcomes: list[GairOutcome | None] = [None] * len(plans)
        if gair:
            if not all(p.tokens for p in plans):
                raise QueryError(
                    "GAIR mixes the query with and without a token: pass `tokens=[NAME]` and write * in the query"
                )
            means = np.stack([self.concept_mean(p, concept_images) for p in plans])
            outcomes = run_gair(
                plans, self.backbone, means, attrs, gair_config, self.cache_dir, progress, on_image=on_image
            )
            vectors = np.stack([o.query_vector for o in outcomes])
        else:
            vectors = np.stack([composed_feature(self.clip, p) for p in plans])
        hits = (
            search_vectors(self.store, vectors.astype(np.float32), k)
            if self.index_dir is not None
            else [[] for _ in plans]
        )
        return [
            ComposedResult(
                t,
                p.composed,
                self.model,
                h,
                tuple(x.info.name for x in p.tokens),
                tuple(a),
                truncated(self.clip, p, a),
                o,
            )
            for t, p, h, a, o in zip(texts, plans, hits, attrs, outcomes)
        ]

    def query_mix(
        self,
        mix: str | Sequence[Term],
        *,
        k: int = 10,
        images: Mapping[str, Image.Image] | None = None,
        tokens: Sequence[TokenRef] = (),
    ) -> MixResult:
        """A weighted mix of texts and images (retrieval.mix: `"2:a red dress" + photo.jpg - "hat" + #12`, or its parsed
        terms): sum_i w_i f(term_i), L2-normalised, searched. f is the unit CLIP feature of the term: of its text
        (composed with TOKENS when it has `*` or <name>), of the gallery image `#ID` (its stored embedding), or of the
        image that IMAGES gives under a file name (the engine opens no path written in a query). A plain sentence is
        a mix of one term, with the same hits as `query`."""
        # 1. the terms, and every check that needs no model
        if k < 1:
            raise ValueError(f"`k={k}`: ask for at least one result")
        terms = parse_mix(mix) if isinstance(mix, str) else list(mix)
        if not terms:
            raise QueryError("`mix` has no terms: write a query, e.g. '\"a red dress\" + #12'")
        images = dict(images or {})
        named = {t.value for t in terms if t.kind == FILE}
        missing, unused = sorted(named - set(images)), sorted(set(images) - named)
        if missing:
            raise QueryError(
                f"the query names the image file {missing[0]!r} but `images` has no image of that name "
                f"(given: {', '.join(map(repr, images)) or 'none'}): pass `images={{{missing[0]!r}: PIL.Image}}`"
            )
        if unused:
            raise QueryError(
                f"image {unused[0]!r} is given but the query does not name it: write {unused[0]} in the query "
                f'(e.g. "a red dress" + {unused[0]})'
            )
        given = {t.info.name: t for t in map(self.token, tokens)}
        uses = [self._tokens_in(t.value, given) if t.kind == TEXT else [] for t in terms]
        idle = sorted(set(given) - {n for u in uses for n in u})
        if idle:
            raise QueryError(
                f"token {idle[0]!r} is given but no term of the mix uses it: write * (or <{idle[0]}>) in a quoted "
                'term, e.g. "a person wearing a *" + #12'
            )
        plain = [i for i, t in enumerate(terms) if t.kind == TEXT and not uses[i] and STAR not in t.value]
        if plain:
            self.check_queries([terms[i].value for i in plain])  # <name> of a stored token not given
        store = self.store  # one committed version for the ids and the search
        ids = [i for i, t in enumerate(terms) if t.kind == GALLERY_ID]
        self._check_ids(store, [int(terms[i].value) for i in ids])
        # 2. one unit feature per term, (n_terms, dim): words, gallery images and given images each in one batch
        vectors = np.zeros((len(terms), self.clip.dim), np.float32)
        if plain:
            vectors[plain] = self.clip.encode_texts([terms[i].value for i in plain])
        for i, t in enumerate(terms):
            if t.kind == TEXT and i not in plain:
                vectors[i] = composed_feature(self.clip, self.plan(t.value, [given[n] for n in uses[i]]))
        if ids:
            vectors[ids] = store.vectors_for_ids(np.array([int(terms[i].value) for i in ids]))
        files = [i for i, t in enumerate(terms) if t.kind == FILE]
        if files:
            vectors[files] = self.clip.encode_pil([images[terms[i].value] for i in files])
        # 3. the weighted sum, normalised, and the search
        q = combine(np.array([t.weight for t in terms]), vectors)  # (dim,)
        hits = search_vectors(store, q[None], k, images=all(t.kind != TEXT for t in terms))[0]  # images only
        used = tuple(dict.fromkeys(n for u in uses for n in u))
        return MixResult(mix if isinstance(mix, str) else "", self.model, terms, hits, used)

    def query_image(self, image: Image.Image | int, k: int = 10, *, name: str | None = None) -> QueryResult:
        """The images nearest IMAGE: a PIL image (encoded by the CLIP), or a gallery id ("more like this": its stored
        embedding, the image itself left out of the hits). NAME: the result's query (default "#ID", or "image")."""
        if k < 1:
            raise ValueError(f"`k={k}`: ask for at least one result")
        store = self.store
        if isinstance(image, Image.Image):
            hits = search_vectors(store, self.clip.encode_pil([image]), k, images=True)[0]
            return QueryResult(name or "image", self.model, hits)
        if isinstance(image, bool) or not isinstance(image, (int, np.integer)):
            raise TypeError(f"`image` must be a PIL image or a gallery id (int), not {type(image).__name__}")
        image_id = int(image)
        self._check_ids(store, [image_id])
        found = search_vectors(store, store.vectors_for_ids(np.array([image_id])), k + 1, images=True)[0]
        hits = [replace(h, rank=r + 1) for r, h in enumerate(h for h in found if h.id != image_id)][:k]
        return QueryResult(name or f"#{image_id}", self.model, hits)

    @staticmethod
    def _tokens_in(text: str, given: Mapping[str, CustomToken]) -> list[str]:
        """The names of the GIVEN tokens a text term uses: those it writes as <name>, else all of them if it has `*`."""
        named = [n for n in given if f"<{n}>" in text]
        return named or (list(given) if STAR in text else [])

    def _check_ids(self, store: IndexStore, ids: Sequence[int]) -> None:
        known = np.isin(np.asarray(ids, np.int64), store.metadata["id"].to_numpy())
        if not known.all():
            bad = int(np.asarray(ids)[~known][0])
            raise QueryError(
                f"no image with id {bad} in the index in {store.dir}: gallery ids come from search results (`Hit.id`)"
            )

    def concept_mean(self, plan: ComposedQuery, concept_images: Sequence[Image.Image] | None = None) -> np.ndarray:
        """Mean CLIP feature of the concept images: of CONCEPT_IMAGES if given, else the token files' stored means
        (averaged over the query's tokens)."""
        if concept_images:
            return self.clip.encode_pil(list(concept_images)).mean(0)
        stored = [np.asarray(t.info.concept_feature, np.float32) for t in plan.tokens]
        if not plan.tokens or any(s.shape != (self.clip.dim,) for s in stored):
            missing = [t.info.name for t, s in zip(plan.tokens, stored) if s.shape != (self.clip.dim,)]
            raise QueryError(
                f"GAIR scores generated images against the concept images, but token(s) {', '.join(missing) or '(none)'} "
                "carry no concept feature (learned by an older version): pass `concept_images=DIR`"
            )
        return np.mean(stored, axis=0)

    def attributes_for(self, plan: ComposedQuery, attributes: Sequence[str] | None) -> tuple[str, ...]:
        """ATTRIBUTES, else the tokens' own context_attributes, else the paper's DeepFashion2 list A (Perera et al.
        Sec. 5, "Text-to-Image Retrieval: DeepFashion2"; GAIR itself is Sec. 4.4)."""
        if attributes:
            return check_attributes(attributes)
        own = [a for t in plan.tokens for a in t.info.context_attributes]
        return check_attributes(list(dict.fromkeys(own))) if own else PAPER_ATTRIBUTES

    def read_concept_images(self, folder: str | Path) -> list[Image.Image]:
        """The images of a folder of concept photos (unreadable files skipped), for GAIR's score and the report."""
        return read_image_folder(folder, 1, "concept images").images

    # ----- seeing what the engine understood
    def generate(
        self,
        prompt: str,
        tokens: Sequence[TokenRef] = (),
        *,
        n: int = 4,
        steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str = "",
        seed: int = 0,
        out: str | Path | None = None,
    ) -> Generated:
        """N images for PROMPT, planned as queries are ([t, *, c]: `*` is the token, its parent word follows);
        image i starts from noise seeded seed + i. steps / guidance_scale: default the diffusion model's own sampler
        settings. OUT: also write them as one PNG grid there (atomically)."""
        if n < 1 or (steps is not None and steps < 1):
            raise ValueError("`n` and `steps` must be >= 1")
        plan = self.plan(prompt, tokens)
        backbone = self.backbone
        steps, guidance = GairConfig(steps=steps, guidance_scale=guidance_scale).steps_and_guidance(backbone)
        images = backbone.generate(
            [plan.composed],
            {k: v.to(self.clip.device) for k, v in plan.vectors.items()},
            n=n,
            negative_prompt=negative_prompt,
            guidance_scale=guidance,
            steps=steps,
            seed=seed,
        )
        path = None
        if out is not None:
            path, sheet = Path(out), image_grid(images)
            write_atomic(path, lambda p: sheet.save(p, format="PNG"), suffix=".png")
        return Generated(plan.composed, images, path)

    def report(
        self,
        results: Sequence[QueryResult] | Sequence[ComposedResult],
        path: str | Path,
        concept_images: Sequence[Image.Image] | None = None,
    ) -> Path:
        """A self-contained HTML page of RESULTS at PATH: thumbnails; for composed queries the concept images
        (CONCEPT_IMAGES, else up to 4 from the folders the tokens were learned from) and GAIR's images."""
        root = self.store.manifest["gallery_root"]
        if not results or not isinstance(results[0], ComposedResult):
            return write_html(path, results_html(results, root))
        shown = list(concept_images) if concept_images else None
        if shown is None:
            folders = {self.token(n).info.concept_images for r in results for n in r.tokens}
            shown = [
                p
                for f in sorted(x for x in folders if x)
                if Path(f).is_dir()
                for p in sorted(Path(f).iterdir())
                if p.is_file()
            ][:4]
        return write_html(path, composed_html(results, root, shown))
