"""The service's parts, built from the settings: what ``service.py`` declares is wired here.

- ``Front``, the HTTP side, is built when ``service.py`` is imported (no torch): the keys, the signer, the image
  store, the task journal and registry, the drain and the middlewares that use them. BentoML adds middlewares
  and mounts apps before any service instance exists.
- ``Runtime``, the GPU side, is built in the worker by ``build_runtime``: the engine (warmed up), the scheduler
  that alone drives it, ``Generation``, telemetry and the retention sweep.

Mounted apps reach both through BentoML's ``get_current_service()`` (the service instance has ``front`` and
``runtime``); nothing here is a module-level global.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapters.a1111 import JobOwners
from .adapters.a1111_options import OptionsStore
from .core.generation import UPLOAD_MAX_PIXELS, Generation, ModelInfo, Replays, RequestContext
from .core.images import ImageStore
from .core.policy import OPEN_PRINCIPAL, Principal, owner_of
from .core.provenance import Credentials, ManifestReader, Provenance
from .core.styles import StyleBook
from .core.verify import VerifyReport, inspect
from .errors import ModelMissing, Unauthorized
from .http.audit import AuditLog
from .http.auth import KeyFile
from .http.events import EventLog, Progress
from .http.gateway import DEADLINE_HEADER, Gateway
from .http.idempotency import Idempotency, make_idempotency
from .http.journal import TaskJournal
from .http.lifecycle import Lifecycle, task_accepted, task_ended
from .http.ratelimit import JobSlots, RateLimiter
from .http.replicas import TaskDirectory
from .http.retention import RetentionSweeper
from .http.routes import RouteTable
from .http.shutdown import Drain
from .http.signing import Signer, state_secret
from .http.tasks import TaskControl, TaskRegistry
from .http.upload import STATE_KEY as UPLOAD_STATE
from .http.webhooks import Targets, Webhooks, WebhookStore
from .settings import Settings, tags
from .store import modelstore
from .telemetry import metrics

logger = logging.getLogger("sdxl_bento.service")


def require_models(settings: Settings) -> tuple[bool, bool]:
    """Before the service class is declared (its models are class attributes): the base must be in the model
    store (``ModelMissing`` names the command that puts it there); whether the refiner and the checker are used."""
    if modelstore.find(settings.base_model) is None:
        raise ModelMissing(f"cannot start: SDXL base model {settings.base_model!r} is not in the Bento model store. "
                           f"Put it there with:\n  {modelstore.fix_command('base', settings.base_model)}")
    refiner = settings.refiner == "on" or (settings.refiner == "auto" and modelstore.find(settings.refiner_model))
    checker = settings.safety == "on" or (settings.safety == "auto" and modelstore.find(settings.safety_model))
    return bool(refiner), bool(checker)


@dataclass
class Front:
    settings: Settings
    routes: RouteTable
    keys: KeyFile | None
    signer: Signer
    images: ImageStore
    journal: TaskJournal
    tasks: TaskRegistry
    drain: Drain
    a1111_owners: JobOwners = field(default_factory=JobOwners)
    credentials: Credentials | None = None
    """The operator's C2PA signing certificate and key (``SDXL_BENTO_C2PA_CERT``/``_KEY``); None: no signing."""
    verifier: ManifestReader = field(default_factory=ManifestReader)
    """Reads manifests for ``/verify``, under the operator's trust anchors, recognising this service's own."""
    styles: StyleBook = field(default_factory=lambda: StyleBook(None))
    """The operator's prompt styles (``SDXL_BENTO_STYLES_FILE``)."""
    a1111_options: OptionsStore | None = None
    """Each key's AUTOMATIC1111 settings (``/sdapi/v1/options``), in the state folder."""
    events: EventLog | None = None
    """Task events for ``/<task>/events`` (Server-Sent Events)."""
    webhooks: Webhooks | None = None
    progress: Progress | None = None
    idempotency: Idempotency | None = None
    replays: Replays | None = None

    @classmethod
    def build(cls, settings: Settings, routes: RouteTable, requests: Any = None) -> Front:
        s = settings
        secret = s.internal_secret.get_secret_value() if s.internal_secret else None
        journal = TaskJournal(s.state_dir / "tasks.db")
        keys = KeyFile(s.keys_file) if s.keys_file else None
        images = ImageStore(s.image_dir)
        credentials = Credentials.load(s.c2pa_cert, s.c2pa_key) if s.c2pa_cert and s.c2pa_key else None
        anchors = s.c2pa_trust_anchors.read_text() if s.c2pa_trust_anchors else None
        front = cls(settings=s, routes=routes, keys=keys, signer=Signer.load(secret, s.state_dir), images=images,
                    journal=journal, tasks=TaskRegistry(journal), drain=Drain(s.shutdown_grace_s),
                    credentials=credentials,
                    verifier=ManifestReader(trust_anchors=anchors, own=credentials.identity if credentials else None),
                    styles=StyleBook(s.styles_file), a1111_options=OptionsStore(s.state_dir / "a1111-options.json"))
        front.events = EventLog(s.state_dir / "events.db")
        front.webhooks = Webhooks(
            WebhookStore(s.state_dir / "webhooks.db"), Targets(s.webhook_allow), secret_for=front.webhook_secret,
            timeout_s=s.webhook_timeout_s, retry_base_s=s.webhook_retry_base_s, max_age_s=s.webhook_max_age_s,
            progress_interval_s=s.webhook_progress_interval_s,
            observe=lambda outcome: metrics().webhook_attempts.labels(outcome=outcome).inc())
        front.progress = Progress(front.events, webhooks=front.webhooks, scheduler=lambda: front.tasks.scheduler)
        front.tasks.events = front.progress
        journal.listeners.append(task_ended(front.events, front.webhooks))
        front.idempotency = make_idempotency(s.redis(), s.state_dir, ttl_s=s.idempotency_ttl_s,
                                             lease_s=s.timeout + 120)
        front.replays = Replays(images, requests)
        return front

    def a1111_settings(self, principal: Principal) -> dict[str, Any]:
        """The caller's AUTOMATIC1111 options (``POST /sdapi/v1/options``): its key's, or everyone's without keys."""
        return self.a1111_options.get(owner_of(principal)) if self.a1111_options is not None else {}

    def webhook_secret(self, owner: str | None) -> str | None:
        """The ``whsec_`` secret that signs deliveries of ``owner``'s jobs: its key's (keys file), or without keys
        the server's (``SDXL_BENTO_WEBHOOK_SECRET``, else made once in the state folder)."""
        if self.keys is not None:
            principal = self.keys.by_name(owner) if owner is not None else None
            secret = getattr(principal, "webhook_secret", None)
            return secret.get_secret_value() if secret is not None else None
        if self.settings.webhook_secret is not None:
            return self.settings.webhook_secret.get_secret_value()
        from .http.auth import new_webhook_secret

        return state_secret(self.settings.state_dir / "webhook-secret", new_webhook_secret,
                            "SDXL_BENTO_WEBHOOK_SECRET")

    def prune_lifecycle(self, older_than_s: float) -> None:
        """Events, webhook records and idempotency keys go with the tasks they belong to (retention sweep)."""
        for prune in (lambda: self.events.prune(older_than_s), lambda: self.webhooks.store.prune(older_than_s),
                      lambda: getattr(self.idempotency.backend, "prune", lambda: 0)()):
            try:
                prune()
            except Exception:
                logger.exception("lifecycle retention")

    def middlewares(self) -> list[tuple[type, dict[str, Any]]]:
        """In order, the outermost first: the gateway sees every request before the task routes do."""
        s = self.settings
        failed = lambda: metrics().redis_failed()  # noqa: E731
        directory = TaskDirectory(s.redis(), s.replica_url) if s.redis() and s.replica_url else None
        sync = tuple(path for path, route in self.routes.generation.items()  # synchronous, so webhooks come after
                     if not (route.task or route.batch or route.upload) and path not in self.routes.task_prefixes)
        return [
            (Gateway, dict(keys=self.keys, routes=self.routes, signer=self.signer, drain=self.drain,
                           limiter=RateLimiter(s.redis(), on_redis_failure=failed),
                           slots=JobSlots(s.redis(), on_redis_failure=failed),
                           audit=AuditLog(s.audit_path(), max_bytes=s.audit_max_bytes, stdout=s.audit_stdout,
                                          prompts=s.audit_prompts),
                           max_body_bytes=s.max_body_bytes,
                           task_cost=lambda task_id: getattr(self.journal.get(task_id), "cost_images", None),
                           idempotency=self.idempotency, targets=self.webhooks.targets, wait_s=s.timeout + 60)),
            (Lifecycle, dict(journal=self.journal, events=self.events, webhooks=self.webhooks,
                             task_prefixes=self.routes.task_prefixes, generation_paths=sync, directory=directory,
                             signer=self.signer, heartbeat_s=s.events_heartbeat_s)),
            (TaskControl, dict(registry=self.tasks, journal=self.journal, task_routes=self.routes.task_prefixes,
                               signer=self.signer, directory=directory, on_accepted=[task_accepted(self.webhooks)])),
        ]

    def principal(self, name: str | None) -> Principal:
        """The principal a task's owner or a batch item's stamp names, as the keys file says now."""
        if self.keys is None:
            return OPEN_PRINCIPAL
        found = self.keys.by_name(name) if name is not None else None
        if found is None:
            raise Unauthorized(f"the key {name!r} that sent this request is no longer in the keys file")
        return found

    def request_context(self, ctx: Any) -> RequestContext:
        """What the gateway learned about this request (caller, deadline), and where to note the outcome. A
        request that did not pass the gateway (none should) runs as nobody: with keys, it is refused."""
        state = ctx.request.state
        if not hasattr(state, "audit"):
            state.audit = {}
        principal = getattr(state, "principal", None)
        if principal is None:
            if self.keys is not None:
                raise Unauthorized("this request did not pass the gateway")
            principal = OPEN_PRINCIPAL
        return RequestContext(principal=principal, deadline_s=getattr(state, "deadline_s", None), audit=state.audit)

    def task_context(self, ctx: Any, owner: str | None) -> RequestContext:
        """A task runs as its owner, by the journal (a retry reaches it without the gateway's state), with the
        deadline its stored request asked for (the gateway checked it at submission)."""
        state = ctx.request.state
        if not hasattr(state, "audit"):
            state.audit = {}
        try:
            deadline = float(ctx.request.headers.get(DEADLINE_HEADER, ""))
        except ValueError:
            deadline = None
        return RequestContext(principal=self.principal(owner), deadline_s=deadline, audit=state.audit)

    def image_link(self, image_id: str) -> str:
        return self.signer.image_query(image_id, self.settings.image_url_ttl_s)

    async def verify(self, ctx: Any) -> VerifyReport:
        """``POST /verify``: the file the gateway read (``http/upload.py``), inspected off the event loop."""
        state = ctx.request.state
        upload = getattr(state, UPLOAD_STATE, None)
        if upload is None:
            raise Unauthorized("this request did not pass the gateway")
        return await asyncio.to_thread(inspect, upload.data, self.verifier, max_pixels=UPLOAD_MAX_PIXELS,
                                       max_bytes=self.settings.max_upload_bytes)


@dataclass
class Runtime:
    engine: Any
    scheduler: Any
    generation: Generation
    throttle: Any
    retention: RetentionSweeper
    refiner_tag: str | None
    checkpoint_tags: tuple[str, ...] = ()
    """The checkpoints the operator configured (the base and ``SDXL_BENTO_CHECKPOINTS``), as given."""
    webhooks: Any = None

    def ready(self, front: Front) -> bool:
        """``/readyz``: not while shutting down, nor while a hot GPU has paused admission."""
        from .gpu.thermal import ThrottleState

        return not front.drain.draining and self.throttle.state != ThrottleState.paused

    def stop(self) -> None:
        self.retention.stop()
        self.scheduler.stop()
        if self.webhooks is not None:
            self.webhooks.stop()

    def refresh_checkpoints(self) -> list[str]:
        """Look the configured checkpoints up in the model store again (AUTOMATIC1111's refresh-checkpoints): a
        version imported since the start becomes what its name runs. Returns the tags newly registered."""
        known = {row["tag"] for row in self.engine.manager.available()}
        added = []
        for tag in self.checkpoint_tags:
            stored = modelstore.find(tag)
            if stored is not None and stored.metadata.get("role") == "base" and stored.tag not in known:
                self.engine.add_checkpoint(stored)
                added.append(stored.tag)
        return added


def build_runtime(settings: Settings, front: Front, base: Any, refiner: Any, checker: Any) -> Runtime:
    """The GPU side, in the worker: ``base``, ``refiner`` and ``checker`` are the model store's entries (the
    last two may be None)."""
    import torch
    from bentoml._internal.configuration.containers import BentoMLContainer

    from .core.cache import make_cache
    from .core.prompts import PromptPolicy
    from .core.safety import ImageGuard
    from .core.watermark import Watermarker
    from .gpu.accel import Acceleration
    from .gpu.checkers import load_checker
    from .gpu.engine import Engine, pick_device
    from .gpu.environment import Environment
    from .gpu.scheduler import Scheduler
    from .gpu.thermal import NvmlSource, StaticSource, Throttle, start_gpu_telemetry
    from .gpu.vram import SDXL_FP16, VramBudget
    from .store.loras import find_lora

    s = settings
    for stored in filter(None, (base, refiner)):
        if stored.synthetic:
            logger.warning("!!! SERVING A SYNTHETIC MODEL: %s has random weights (%s); its images are noise. "
                           "Import real SDXL weights with `sdxl-bento models import`. !!!",
                           stored.tag, stored.metadata.get("source"))
    if front.keys is None:
        logger.warning("no API keys file (SDXL_BENTO_KEYS_FILE): the service is open to anyone who reaches it")
    else:
        front.keys.install_sighup()
    lost = front.journal.recover()
    if lost:
        logger.warning("%d task(s) were unfinished when the service last stopped: marked failed (restart)", lost)

    device, _ = pick_device(s.device)
    acceleration = Acceleration.resolve(device, compile=s.compile, cuda_graphs=s.cuda_graphs, vae_dtype=s.vae_decode,
                                        compile_cache=s.compile_cache_dir, max_graphs=s.max_cuda_graphs)
    engine = Engine(base, refiner, device=device, budget_bytes=s.model_budget_bytes, acceleration=acceleration,
                    deepcache_interval=s.deepcache_interval)
    pinned = set(tags(s.pinned_checkpoints))
    for tag in tags(s.checkpoints):
        engine.add_checkpoint(modelstore.resolve(tag, "base"), pinned=tag in pinned)
    engine.manager.on_swap = lambda tag, seconds: metrics().model_swap_seconds.observe(seconds)
    logger.info("warm-up took %.2f s", engine.warmup(*s.warmup(device)))
    rate = engine.seconds_per_unit(*s.warmup(device))
    metrics().acceleration.labels(**engine.acceleration.labels()).set(1)

    # After warm-up the free GPU memory is what batches may use; without CUDA there is no budget.
    budget = VramBudget.measure(SDXL_FP16, headroom=s.vram_headroom, device=torch.cuda.current_device()) \
        if engine.device == "cuda" else None
    throttle = Throttle(NvmlSource.open() or StaticSource([]), slow_above_c=s.gpu_slow_above_c,
                        pause_above_c=s.gpu_pause_above_c, resume_below_c=s.gpu_resume_below_c)
    start_gpu_telemetry(throttle)
    scheduler = Scheduler(engine, max_batch_requests=s.concurrency, max_batch_images=s.max_batch_images,
                          max_jobs=s.max_concurrency, aging_per_minute=s.aging_per_minute, observer=metrics(),
                          throttle=throttle, budget=budget, is_loaded=engine.manager.is_loaded)
    engine.preview_every = s.preview_every
    engine.previewer = _previewer(s, engine)
    scheduler.seed_rate(rate)  # task ETAs from the first request on
    scheduler.start()
    front.tasks.scheduler = front.drain.scheduler = scheduler
    front.drain.install()

    retention = RetentionSweeper(front.images, front.journal, image_max_age_s=s.image_retention_s,
                                 image_max_bytes=s.image_store_max_bytes, task_max_age_s=s.task_retention_s,
                                 interval_s=s.retention_sweep_s, on_sweep=lambda stats, pruned: (
                                     metrics().observe_retention(stats, pruned),
                                     front.prune_lifecycle(s.task_retention_s)),
                                 runner_db=Path(BentoMLContainer.result_store_file.get()))
    retention.start()

    guard = None
    if checker is not None:
        guard = ImageGuard(load_checker(checker.metadata["kind"], checker.path, device=engine.device),
                           threshold=s.safety_threshold, action=s.safety_action)
        logger.info("NSFW check of every image with %s (%s, %s)", checker.tag, checker.metadata["kind"],
                    s.safety_action)
    else:
        logger.warning("no NSFW checker (%s not in the store): images are not checked", s.safety_model)
    watermark = s.watermark == "on" or (s.watermark == "auto" and not engine.models.synthetic)
    environment = Environment(engine, s.state_dir, refiner=refiner)  # the weights' sha256, for both manifests
    provenance = None
    if front.credentials is not None:
        provenance = Provenance(front.credentials, tsa_url=s.c2pa_tsa_url, include_prompt=s.c2pa_include_prompt,
                                reader=front.verifier)
        provenance.self_test()
        logger.info("C2PA: every image is signed as %s (%s)%s", front.credentials.subject, front.credentials.alg,
                    f", timestamped by {s.c2pa_tsa_url}" if s.c2pa_tsa_url else "")
    else:
        logger.warning("C2PA signing is off (no SDXL_BENTO_C2PA_CERT and SDXL_BENTO_C2PA_KEY): images carry no "
                       "Content Credentials")

    generation = Generation(
        scheduler, front.images, ModelInfo(base.tag, refiner.tag if refiner else None, engine.models.synthetic),
        timeout=s.timeout, public_url=s.public_url, metrics=metrics(), guard=guard,
        cache=make_cache(s.redis(), front.images, ttl_s=s.cache_ttl_s, max_bytes=s.cache_max_bytes)
        if s.cache else None, cache_unseeded=s.cache_unseeded, watermarker=Watermarker(watermark),
        policy=PromptPolicy.load(s.policy_file) if s.policy_file else None,
        resolve_model=engine.manager.resolve, has_lora=lambda name: find_lora(name) is not None,
        max_upload_bytes=s.max_upload_bytes, sign_link=front.image_link if front.keys is not None else None,
        provenance=provenance, weights_sha256=environment.sha256, styles=front.styles,
        describe=environment.describe)
    front.webhooks.start()
    return Runtime(engine=engine, scheduler=scheduler, generation=generation, throttle=throttle,
                   retention=retention, refiner_tag=refiner.tag if refiner else None,
                   checkpoint_tags=(s.base_model, *tags(s.checkpoints)), webhooks=front.webhooks)


def _previewer(settings: Settings, engine: Any) -> Any:
    """TAESD-XL when it is in the model store, else SDXL's linear latent-to-RGB approximation."""
    from .gpu.previews import LinearPreview, TaesdPreview

    stored = modelstore.find(settings.preview_model)
    if stored is not None and stored.metadata.get("role") == "preview":
        try:
            previewer = TaesdPreview(stored.path, engine.device, engine.dtype, size=settings.preview_size)
            logger.info("previews decoded by %s (TAESD)", stored.tag)
            return previewer
        except Exception:
            logger.exception("TAESD %s could not be loaded; previews use the linear approximation", stored.tag)
    return LinearPreview(size=settings.preview_size)
