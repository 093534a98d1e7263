"""Past one machine: the two expensive loops on a Ray cluster (the optional extra, `pip install '.[ray]'`).

    index_gallery(gallery, index_dir, config, embedder=RayEmbedder(address="auto"))   # shards embedded on the cluster
    tokens = learn_tokens_on_ray("toyworld", None, [TokenJob(config, concepts)], negatives_dir, batch_size=8)

Embedding (`RayEmbedder`, the `embedder` of retrieval.indexer.index_gallery). Steps of one call, in plain sight:
 1. connect: the Ray this process is already connected to, else `ray.init(address)` (None: a new local Ray);
 2. place the actors: one per GPU holding the model (`num_gpus=1`), or, on a cluster without GPUs, one per
    `cpus_per_actor` CPUs; each loads `ClipEncoder.from_spec(config.model)` once and decodes in its own process
    (`IndexingConfig.workers` = its CPUs - 1 decoding processes, 0 in a 1-CPU actor);
 3. the pool (`run_pool`): each actor, once started, has two shards submitted at a time and gets the next as one
    finishes (`retrieval.indexer.embed_shard`; the decoding happens there, so the gallery must be readable from
    every node: a shared folder, or an fsspec URL such as s3://);
 4. each finished shard is written to work/ by this process (`indexes.shards.write_shard`, the resume point: the
    workers need no shared disk for the index) and counted on the progress bar;
 5. a shard whose actor died (killed, out of memory, node lost) goes back to the front of the queue and runs
    on another actor, up to `max_retries` times; the dead actor restarts (Ray `max_restarts`) and rejoins;
 6. the outputs, in plan order; the actors are released (and the Ray this call started is shut down), unless
    `keep_actors` keeps them, with their loaded models, for the next call until `close()`.
A shard's output depends only on its files and the model, so the index equals a local run's: same ids, paths and
skipped files; embeddings equal to float16 rounding (a CPU actor computes with its own thread count).

Token learning (`learn_tokens_on_ray`): every (method, seed) job's concepts are cut into batches of `batch_size`,
one task each, run by actors that load the models by name once (`retrieval.models.pairing.load_models`) and call
`tokens.learn.learn_tokens`. A concept's token does not depend on its batch mates (tokens.trainer: each concept
draws from its own generator, the loss is a sum over concepts, Adam is element-wise; the negatives are sampled per
parent prompt with the config's seed) once its seed is fixed: concepts without one get the seed a single local
batch would give them (config.seed + their place in the job), so the tokens equal `learn_tokens` on the whole job
up to the numerics of a smaller batch (~1e-6).

Ray is imported inside the functions, so the project runs without the extra. Workers import this project: install
it on every node (or ship it with a Ray runtime_env).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from indexes.shards import ShardInput, ShardOutput, mapped, write_shard
from retrieval.indexer import IndexingConfig, ShardPlan, embed_shard
from retrieval.models.encoders import ClipEncoder
from tokens.learn import ConceptImages, learn_tokens
from tokens.methods import TokenTrainConfig
from tokens.token_file import CustomToken

INSTALL_HINT = "pip install '.[ray]'  (or: pip install 'personal-retrieval[ray]')"
PROCESS_LOCAL_PROTOCOLS = ("memory://",)  # fsspec filesystems that live in one process: no worker can read them


def import_ray():
    """The ray module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"Ray is not installed: {INSTALL_HINT}") from e
    return ray


class RayWorkers:
    """Actors of one kind on a Ray cluster, and the connection they live on, kept between calls until `close()`.

    The connection: the one this process already has (left open), else `ray.init(ADDRESS)` ("auto": the cluster
    `ray start` runs on this machine; "HOST:PORT"; "ray://HOST:10001"; None: a new local Ray on this machine's
    cores), shut down by `close()`. The actors: made by `get(key, make)` and kept while the key stays the same.
    """

    def __init__(self, address: str | None):
        self.address = address
        self._ray = None
        self._owns_connection = False
        self._key = None
        self._actors: list = []

    def ray(self):
        if self._ray is None:
            ray = import_ray()
            if not ray.is_initialized():
                # address="local" always starts a new Ray: plain ray.init() joins any cluster found on the machine
                ray.init(address=self.address or "local", include_dashboard=False, logging_level="WARNING")
                self._owns_connection = True
            self._ray = ray
        return self._ray

    @property
    def key(self):
        """What the kept actors were made for (None when there are none)."""
        return self._key

    def get(self, key, make: Callable[[], list]) -> list:
        """The actors made for KEY (by MAKE(), unless those of the last call had the same key)."""
        if key != self._key or not self._actors:
            self.release()
            self._actors, self._key = make(), key
        return self._actors

    def wait_ready(self, timeout: float | None = None) -> int:
        """Wait until every kept actor has started (its model loaded), at most TIMEOUT seconds; how many there are."""
        if self._actors:
            self._ray.get([actor.__ray_ready__.remote() for actor in self._actors], timeout=timeout)
        return len(self._actors)

    def release(self) -> None:
        """Kill the actors (their models and GPUs are freed); the connection stays."""
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors, self._key = [], None

    def close(self) -> None:
        """Release the actors and shut down the Ray connection this object opened."""
        if self._ray is None:
            return
        self.release()
        if self._owns_connection and self._ray.is_initialized():
            self._ray.shutdown()
        self._ray, self._owns_connection = None, False


class _Pooled:
    """What RayEmbedder and RayTokenLearner share: their `RayWorkers`, closed at the end of a `with` block."""

    workers: RayWorkers

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the actors and the Ray connection this object opened."""
        self.workers.close()

    def wait_ready(self, timeout: float | None = None) -> int:
        """With `keep_actors`: wait until every kept actor has started (at most TIMEOUT s), so that the next call
        spreads its work over all of them from the start; the number of actors."""
        return self.workers.wait_ready(timeout)


def ray_task_error() -> type:
    """ray.exceptions.RayTaskError: an error raised by the work on a worker (not the worker's death)."""
    return import_ray().exceptions.RayTaskError


@dataclass(frozen=True)
class Slots:
    """Where the actors go: how many, and what each holds."""

    actors: int  # how many actors
    cpus: float  # CPUs each reserves (its torch threads, and decoding processes beyond the first)
    gpus: float  # GPUs each reserves: 1 or 0


def plan_slots(
    resources: dict, use_gpu: bool, num_actors: int | None = None, cpus_per_actor: float | None = None
) -> Slots:
    """One actor per GPU (each with an equal share of the CPUs, at most 5: the encoder's thread and 4 decoders),
    or one per CPUS_PER_ACTOR (default 1) CPUs; NUM_ACTORS overrides the count. RESOURCES: ray.cluster_resources()."""
    cpus, gpus = float(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    if use_gpu:
        per = cpus_per_actor or max(1, min(5, int(cpus // max(gpus, 1))))
        return Slots(actors=max(1, num_actors or gpus), cpus=per, gpus=1)
    per = cpus_per_actor or 1
    return Slots(actors=max(1, num_actors or int(cpus // per)), cpus=per, gpus=0)


@dataclass
class PoolStats:
    """What a pool run did: which actor did each item, which items were retried after their actor died."""

    done_by: dict[int, int] = field(default_factory=dict)  # item key -> index of the actor that finished it
    retried: list[int] = field(default_factory=list)  # item keys, once per retry
    actors: int = 0  # actors in the pool
    dropped: list[int] = field(default_factory=list)  # indices of actors that died for good


def run_pool(
    ray,
    actors: list,
    items: Sequence[tuple[int, Any]],
    call: Callable[[Any, int, Any], Any],
    on_result: Callable[[int, Any, Any], None],
    max_retries: int,
    actor_restarts: int,
    depth: int = 2,
    on_started: Callable[[int], None] | None = None,
) -> PoolStats:
    """Run every (key, item) of ITEMS on the ACTORS, each idle actor taking the next: CALL(actor, key, item) submits
    it (an ObjectRef), ON_RESULT(key, item, result) gets each result in this process as it arrives. An actor joins
    once it has started (one the cluster has no room for yet never holds work back), and then has DEPTH items
    submitted at a time, so that it starts the next while this process takes in the last. An item whose
    actor died runs again (first in line, on another actor where one is idle) up to MAX_RETRIES times; an actor that
    died more than ACTOR_RESTARTS times, or whose constructor failed, is dropped. An error raised by the work itself
    is not retried (it would fail again): nothing more is submitted, the items still running finish (their results
    reach ON_RESULT: for shards, more of the resume point), and the error is raised."""
    from ray.exceptions import RayActorError, RayTaskError

    stats = PoolStats(actors=len(actors))
    todo = deque(items)
    starting = {actor.__ray_ready__.remote(): a for a, actor in enumerate(actors)}  # ObjectRef -> actor index
    idle: list[int] = []  # free slots, as actor indices (DEPTH per actor); taken from the end, a suspect's go first
    running: dict[Any, tuple[int, int, Any]] = {}  # ObjectRef -> (actor index, key, item)
    attempts, deaths = Counter(), Counter()
    while todo or running:
        while todo and idle:
            a = idle.pop()
            key, item = todo.popleft()
            running[call(actors[a], key, item)] = (a, key, item)
        if not running and not starting:
            raise RuntimeError(f"every actor died; {len(todo)} items were left undone")
        # an actor that has started joins first: ray.wait gives the first ready ref in list order, so with the
        # running items first a quick actor could keep the pool to itself
        [ref], _ = ray.wait([*starting, *running], num_returns=1)
        if ref in starting:  # 1. an actor has started (its model loaded): its slots join the pool
            a = starting.pop(ref)
            try:
                ray.get(ref)
            except RayActorError as e:
                if e.actor_init_failed:  # a model that does not load: every actor would fail the same way
                    raise RuntimeError(f"a Ray actor failed to start: {e}") from e
                stats.dropped.append(a)
                continue
            idle += [a] * depth
            if on_started is not None:
                on_started(len(actors) - len(starting) - len(stats.dropped))  # actors started so far
            continue
        a, key, item = running.pop(ref)  # 2. an item is done, or its actor died
        try:
            result = ray.get(ref)
        except RayActorError as e:
            if e.actor_init_failed:  # a model that does not load: every actor would fail the same way
                raise RuntimeError(f"a Ray actor failed to start: {e}") from e
            attempts[key] += 1
            deaths[a] += 1  # failed items: up to DEPTH per death of the actor
            if attempts[key] > max_retries:
                raise RuntimeError(f"item {key} failed {attempts[key]} times (its actor died each time): {e}") from e
            stats.retried.append(key)
            todo.appendleft((key, item))
            if deaths[a] <= (actor_restarts + 1) * depth - 1:  # it restarts (Ray max_restarts): last in line
                idle.insert(0, a)
            elif a not in stats.dropped:
                stats.dropped.append(a)
            continue
        except RayTaskError:
            _drain(ray, running, on_result)
            raise
        on_result(key, item, result)
        stats.done_by[key] = a
        idle.append(a)
    return stats


def _drain(ray, running: dict, on_result: Callable[[int, Any, Any], None]) -> None:
    """Let the items still RUNNING finish, their results to ON_RESULT; their errors are dropped (one is raised)."""
    for ref, (_, key, item) in running.items():
        try:
            result = ray.get(ref)
        except Exception:  # noqa: BLE001 - the caller raises the first error
            continue
        on_result(key, item, result)
    running.clear()


# ---------------------------------------------------------------- embedding
class ShardWorker:
    """The Ray actor of `RayEmbedder`: one loaded encoder, embedding shard after shard."""

    def __init__(self, config: IndexingConfig, device: str, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.config = config
        self.encoder = ClipEncoder.from_spec(config.model, device=device, precision=config.precision)

    def embed(self, number: int, shard: ShardInput, on_start=None) -> ShardOutput:
        if on_start is not None:
            on_start(number, shard)
        return embed_shard(shard, self.encoder, self.config)


class RayEmbedder(_Pooled):
    """An `embedder` for retrieval.indexer.index_gallery that embeds the planned shards on a Ray cluster (steps in
    the module docstring). Callable as embedder(plan, config, work_dir, progress) -> outputs in plan order.

    ADDRESS: None (a new local Ray), "auto" (the cluster started on this machine), "HOST:PORT" or "ray://HOST:PORT";
    an existing ray.init() connection of this process is used as it is.
    NUM_ACTORS: None = one per GPU of the cluster (config.device "cpu": one per CPUS_PER_ACTOR CPUs), at least 1.
    MAX_RETRIES: times a shard is run again after its actor died, and times each actor restarts.
    KEEP_ACTORS: keep the actors (their loaded models) and the connection for the next call, until `close()` (or the
    end of a `with` block); False releases them after each call.
    ON_SHARD_START(number, shard): called in the actor before each shard (monitoring; tests inject crashes with it).
    After a call, `stats` tells which actor embedded each shard and which shards were retried.
    """

    def __init__(
        self,
        address: str | None = None,
        num_actors: int | None = None,
        max_retries: int = 3,
        cpus_per_actor: float | None = None,
        keep_actors: bool = False,
        on_shard_start: Callable[[int, ShardInput], None] | None = None,
    ):
        if num_actors is not None and num_actors < 1:
            raise ValueError(f"`num_actors` must be >= 1 or None, got {num_actors}")
        if max_retries < 0:
            raise ValueError(f"`max_retries` must be >= 0, got {max_retries}")
        import_ray()  # say how to install it now, not after the scan
        self.workers = RayWorkers(address)
        self.num_actors = num_actors
        self.max_retries = max_retries
        self.cpus_per_actor = cpus_per_actor
        self.keep_actors = keep_actors
        self.on_shard_start = on_shard_start
        self.stats = PoolStats()

    def __call__(self, plan: ShardPlan, config: IndexingConfig, work_dir: Path, progress: bool) -> list[ShardOutput]:
        # 0. check inputs: every worker must be able to read the gallery
        for _, shard in plan.to_embed[:1]:
            if shard.gallery_root.startswith(PROCESS_LOCAL_PROTOCOLS):
                raise ValueError(
                    f"gallery {shard.gallery_root} lives in this process's memory: Ray workers cannot read it; copy "
                    "it to a filesystem every node reads (a shared folder, s3://, gs://) or index it without Ray"
                )
        outputs: dict[int, ShardOutput] = {}
        try:
            # 1. + 2. the connection and the actors (those of the last call when kept and of the same config)
            ray = self.workers.ray()
            actors = self.workers.get(config, lambda: self._make_actors(ray, config, len(plan.to_embed)))
            total = sum(len(shard.files) for _, shard in plan.to_embed)
            skipped = 0
            desc = f"embedding on {len(actors)} Ray actors"
            with tqdm(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
                # actors take a while to start (each imports torch and loads the model): say so until all have
                bar.set_postfix_str(f"starting actors: 0/{len(actors)} ready (each loads the model)")

                def started(ready: int) -> None:
                    if ready < len(actors):
                        bar.set_postfix_str(f"starting actors: {ready}/{len(actors)} ready")
                    else:
                        bar.set_postfix(skipped=skipped)

                def finished(number: int, shard: ShardInput, out: ShardOutput) -> None:
                    # 4. the resume point, written here: the workers need no access to the index folder
                    nonlocal skipped
                    outputs[number] = mapped(write_shard(work_dir, number, shard, out), out)  # not kept in RAM
                    skipped += len(out.skipped)
                    bar.update(len(shard.files))
                    bar.set_postfix(skipped=skipped, refresh=False)

                # 3. + 5. the pool: the next shard to each idle actor; a dead actor's shard runs again elsewhere
                hook = self.on_shard_start
                self.stats = run_pool(
                    ray,
                    actors,
                    plan.to_embed,
                    lambda actor, number, shard: actor.embed.remote(number, shard, hook),
                    finished,
                    max_retries=self.max_retries,
                    actor_restarts=self.max_retries,
                    on_started=started,
                )
            if self.stats.dropped:  # dead for good: the next call makes a full pool again
                self.workers.release()
        except BaseException as e:
            if not isinstance(e, ray_task_error()):  # after a work error the pool drained: the actors are idle
                self.workers.release()  # a failed call leaves no shard running on the cluster
            raise
        finally:
            if not self.keep_actors:
                self.workers.close()
        # 6. in plan order
        return [outputs[number] for number, _ in plan.to_embed]

    def _make_actors(self, ray, config: IndexingConfig, n_shards: int) -> list:
        """The pool: one actor per slot (never more than there are shards, unless they are kept for later calls)."""
        resources = ray.cluster_resources()
        use_gpu = _use_gpu(config.device, resources)
        slots = plan_slots(resources, use_gpu, self.num_actors, self.cpus_per_actor)
        threads = max(1, int(slots.cpus))
        # decoding processes: what the actor's CPUs allow beyond the encoder's thread (none in a 1-CPU actor)
        worker_config = config if config.workers >= 0 else replace(config, workers=max(0, min(4, threads - 1)))
        Worker = ray.remote(ShardWorker).options(
            num_cpus=slots.cpus, num_gpus=slots.gpus, max_restarts=self.max_retries, max_task_retries=0
        )
        device = "cuda" if use_gpu else "cpu"
        n = slots.actors if self.keep_actors else min(slots.actors, n_shards)
        return [Worker.remote(worker_config, device, threads) for _ in range(n)]


def _use_gpu(device: str, resources: dict) -> bool:
    """Whether the actors hold GPUs: config.device auto (when the cluster has any) or cuda; never for cpu."""
    has_gpu = resources.get("GPU", 0) >= 1
    if device.startswith("cuda") and not has_gpu:
        raise ValueError(f"`device={device}`, but the Ray cluster has no GPU: use `device=auto` or `device=cpu`")
    return device != "cpu" and has_gpu


# ---------------------------------------------------------------- token learning
@dataclass
class TokenJob:
    """One (method, seed) of token learning: CONFIG (its method and seed) for every concept of CONCEPTS."""

    config: TokenTrainConfig
    concepts: Sequence[ConceptImages]


class TokenWorker:
    """The Ray actor of `RayTokenLearner`: the paired models, loaded by name once, learning batch after batch."""

    def __init__(self, model: str, diffusion: str | None, need_diffusion: bool, device: str, threads: int):
        import torch

        from retrieval.models.pairing import load_models

        torch.set_num_threads(max(1, threads))
        self.clip, self.backbone = load_models(model, diffusion, need_diffusion=need_diffusion, device=device)

    def learn(self, config: TokenTrainConfig, concepts: list[ConceptImages], negatives_dir) -> list[CustomToken]:
        return learn_tokens(self.clip, self.backbone, config, concepts, negatives_dir, progress=False)


def with_seeds(config: TokenTrainConfig, concepts: Sequence[ConceptImages]) -> list[ConceptImages]:
    """CONCEPTS with the seed each gets in one local `learn_tokens` call (config.seed + its place) where it has
    none, so that a concept's draws do not depend on the batch it is cut into."""
    return [c if c.seed is not None else replace(c, seed=config.seed + i) for i, c in enumerate(concepts)]


class RayTokenLearner(_Pooled):
    """Token learning on a Ray cluster (see the module docstring): learner(jobs, negatives_dir, batch_size) gives,
    per job, its concepts' tokens in order, as `learn_tokens(clip, backbone, job.config, job.concepts,
    negatives_dir)` does, learned in (job, batch) tasks by actors that load the models by name once.

    MODEL, DIFFUSION: the specs every worker loads (`load_models`; DIFFUSION None: the one paired with MODEL).
    DEVICE: auto (a GPU per actor where the cluster has them), cpu or cuda. ADDRESS, NUM_ACTORS, MAX_RETRIES,
    KEEP_ACTORS: as `RayEmbedder`'s (kept actors hold their models between calls, e.g. one per (method, seed)).
    """

    def __init__(
        self,
        model: str,
        diffusion: str | None = None,
        address: str | None = None,
        device: str = "auto",
        num_actors: int | None = None,
        max_retries: int = 2,
        keep_actors: bool = False,
    ):
        import_ray()
        self.model, self.diffusion, self.device = model, diffusion, device
        self.workers = RayWorkers(address)
        self.num_actors, self.max_retries, self.keep_actors = num_actors, max_retries, keep_actors

    def __call__(
        self,
        jobs: Sequence[TokenJob],
        negatives_dir: str | Path | None,
        batch_size: int | None = None,
        progress: bool = True,
    ) -> list[list[CustomToken]]:
        """BATCH_SIZE: concepts per task (the batch of one training loop); None: each job's concepts split evenly
        over the actors. NEGATIVES_DIR: where sampled negatives are cached; every worker must be able to write it (a
        shared folder; on one machine any folder), or None."""
        # 1. check inputs; every concept gets the seed of its place in its job
        if not jobs or any(not job.concepts for job in jobs):
            raise ValueError("no concepts to learn tokens for: every job needs at least one concept")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1 or None, got {batch_size}")
        jobs = [TokenJob(job.config, with_seeds(job.config, job.concepts)) for job in jobs]
        need_diffusion = any(
            job.config.needs_diffusion(negatives_given=all(c.negatives is not None for c in job.concepts))
            for job in jobs
        )
        results: dict[int, list[CustomToken]] = {}
        try:
            # 2. the actors: one per GPU, else one per CPU (those of the last call when kept and enough)
            ray = self.workers.ray()
            # kept actors that hold a diffusion model serve jobs that need none as well
            key = need_diffusion or self.workers.key is True
            actors = self.workers.get(key, lambda: self._make_actors(ray, key))
            # 3. the tasks: (job, batch of concepts), keyed by their place
            per = batch_size or max(1, math.ceil(max(len(job.concepts) for job in jobs) / len(actors)))
            tasks = [
                (job.config, list(job.concepts[start : start + per]), j)
                for j, job in enumerate(jobs)
                for start in range(0, len(job.concepts), per)
            ]
            with tqdm(total=sum(len(job.concepts) for job in jobs), unit="token", disable=not progress) as bar:

                def finished(key: int, task, tokens: list[CustomToken]) -> None:
                    results[key] = tokens
                    bar.update(len(tokens))

                # 4. the pool; a batch whose actor died is learned again from its seeds: the same tokens
                stats = run_pool(
                    ray,
                    actors,
                    list(enumerate(tasks)),
                    lambda actor, key, task: actor.learn.remote(task[0], task[1], negatives_dir),
                    finished,
                    max_retries=self.max_retries,
                    actor_restarts=self.max_retries,
                )
            if stats.dropped:
                self.workers.release()
        except BaseException as e:
            if not isinstance(e, ray_task_error()):
                self.workers.release()
            raise
        finally:
            if not self.keep_actors:
                self.workers.close()
        # 5. each job's tokens in its concepts' order
        out: list[list[CustomToken]] = [[] for _ in jobs]
        for key, (_, _, j) in enumerate(tasks):
            out[j] += results[key]
        return out

    def _make_actors(self, ray, need_diffusion: bool) -> list:
        resources = ray.cluster_resources()
        use_gpu = _use_gpu(self.device, resources)
        slots = plan_slots(resources, use_gpu, self.num_actors)
        Worker = ray.remote(TokenWorker).options(
            num_cpus=slots.cpus, num_gpus=slots.gpus, max_restarts=self.max_retries, max_task_retries=0
        )
        device = "cuda" if use_gpu else "cpu"
        args = (self.model, self.diffusion, need_diffusion, device, int(slots.cpus))
        return [Worker.remote(*args) for _ in range(slots.actors)]


def learn_tokens_on_ray(
    model: str,
    diffusion: str | None,
    jobs: Sequence[TokenJob],
    negatives_dir: str | Path | None,
    batch_size: int | None = None,
    address: str | None = None,
    device: str = "auto",
    num_actors: int | None = None,
    progress: bool = True,
) -> list[list[CustomToken]]:
    """Per job, its concepts' tokens in order, as `learn_tokens` gives them, learned on a Ray cluster: one
    `RayTokenLearner` call (see it for the arguments), its actors released after."""
    with RayTokenLearner(model, diffusion, address=address, device=device, num_actors=num_actors) as learner:
        return learner(jobs, negatives_dir, batch_size=batch_size, progress=progress)
