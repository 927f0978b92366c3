"""One typed settings object, read once from ``SDXL_BENTO_*`` environment variables.

No other module reads ``os.environ``: everything else receives a ``Settings`` instance,
so tests can build one with plain keyword arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDXL_BENTO_", extra="ignore", frozen=True)

    base_model: str = "sdxl-base:latest"
    """Bento model store tag of the SDXL base pipeline."""

    refiner_model: str = "sdxl-refiner:latest"
    """Bento model store tag of the SDXL refiner pipeline."""

    refiner: Literal["auto", "on", "off"] = "auto"
    """Load the refiner: ``auto`` when it is in the store, ``on`` requires it, ``off`` never loads it."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where to run: ``auto`` picks CUDA (float16) when present, else the CPU (float32)."""

    image_dir: Path = Field(default_factory=lambda: Path.home() / ".sdxl-bento" / "images")
    """Folder of the image store (generated images, by random UUID)."""

    public_url: str = ""
    """Base URL put in front of ``/images/{id}`` links; empty gives links relative to the server."""

    max_prompt_chars: int = Field(default=500, ge=1, le=10_000)
    """Longest prompt or negative prompt accepted, in characters."""

    max_pixels: int = Field(default=1536 * 1536, ge=256 * 256, le=2048 * 2048)
    """Largest width x height accepted."""

    max_batch_images: int = Field(default=8, ge=1, le=64)
    """Most images generated in one pipeline call (requests are batched up to this)."""

    concurrency: int = Field(default=4, ge=1, le=64)
    """Requests the GPU works on at once: the most requests merged into one engine batch."""

    max_concurrency: int = Field(default=32, ge=1, le=10_000)
    """Requests admitted per worker, running and waiting; beyond it: 503 with Retry-After."""

    timeout: float = Field(default=300.0, gt=0, le=86_400)
    """Seconds a request may wait for its images; work that cannot start in time is never started."""

    workers: int = Field(default=1, ge=1, le=16)
    """BentoML worker processes; each loads its own pipelines (one per GPU)."""

    aging_per_minute: float = Field(default=10.0, ge=0, le=1000)
    """Priority points a waiting request gains per minute, so lower tiers still progress under load."""

    max_body_bytes: int = Field(default=16 * 2**20, ge=1024, le=256 * 2**20)
    """Largest request body accepted (base64 images included); beyond it: 413."""

    max_upload_bytes: int = Field(default=12 * 2**20, ge=1024, le=256 * 2**20)
    """Largest decoded image or mask accepted by /img2img and /inpaint."""

    checkpoints: str = ""
    """More base checkpoints requests may choose with ``model`` (comma-separated model store tags)."""

    pinned_checkpoints: str = ""
    """Checkpoints never unloaded (comma-separated); the default base is always pinned."""

    model_budget_bytes: Optional[int] = Field(default=None, ge=0)
    """Memory for loaded checkpoints; beyond it the least recently used unpinned one is unloaded."""

    max_loras: int = Field(default=4, ge=0, le=16)
    """Most LoRA adapters one request may name."""

    # -- speed ---------------------------------------------------------------------------------
    compile: Literal["auto", "off", "regional"] = "auto"
    """Compile the UNets' repeated transformer blocks; ``auto``: on CUDA only."""

    compile_cache_dir: Path = Field(default_factory=lambda: Path.home() / ".sdxl-bento" / "compile-cache")
    """Inductor's and Triton's kernel cache, kept across restarts (sets ``TORCHINDUCTOR_CACHE_DIR``)."""

    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    """Replay each UNet step from a CUDA graph; ``auto``: on CUDA."""

    max_cuda_graphs: int = Field(default=8, ge=1, le=64)
    """Captured graphs kept per UNet (one per batch size and resolution), least recently used dropped."""

    vae_decode: Literal["auto", "pipeline", "bfloat16"] = "auto"
    """``bfloat16``: decode with a bfloat16 copy of the decoder (fast, no fp16 overflow); ``pipeline``:
    as diffusers does (float32 on CUDA); ``auto``: bfloat16 on CUDA."""

    warmup_size: str = Field(default="auto", pattern=r"^(auto|\d{3,4}x\d{3,4})$")
    """Image size warmed up (compiled, captured) before ready, ``WIDTHxHEIGHT``; ``auto``: 1024x1024 on CUDA."""

    deepcache_interval: int = Field(default=3, ge=2, le=10)
    """``approximation=deepcache``: one full UNet step in this many; the others reuse its deep features."""

    shutdown_grace_s: float = Field(default=30.0, ge=0, le=3600)
    """On SIGTERM: how long running work may go on before what is left fails with reason ``shutdown``."""

    gpu_slow_above_c: float = Field(default=83, ge=30, le=120)
    """GPU temperature above which batches are halved."""

    gpu_pause_above_c: float = Field(default=90, ge=30, le=120)
    """GPU temperature above which no new batch starts (``/readyz`` answers 503 meanwhile)."""

    gpu_resume_below_c: float = Field(default=78, ge=20, le=120)
    """Full speed again only below this temperature (hysteresis)."""

    vram_headroom: float = Field(default=0.9, gt=0, le=1)
    """Share of the GPU memory free after warm-up that batches may use."""

    policy_file: Optional[Path] = None
    """Prompt policy (YAML words and patterns), checked before any GPU work; none: no policy."""

    safety: Literal["auto", "on", "off"] = "auto"
    """NSFW check of every image: ``auto`` when a checker is in the store, ``on`` requires one."""

    safety_model: str = "sdxl-safety:latest"
    """Model store tag of the NSFW checker (``sdxl-bento models import ... --role safety``)."""

    safety_threshold: float = Field(default=0.5, ge=0, le=1)
    """Score at or above which an image is flagged."""

    safety_action: Literal["block", "blur"] = "block"
    """A flagged image is withheld (``block``) or returned blurred (``blur``); either way marked content_filtered."""

    watermark: Literal["auto", "on", "off"] = "auto"
    """Invisible watermark on every image; ``auto``: on for real weights, off for synthetic ones."""

    state_dir: Path = Field(default_factory=lambda: Path.home() / ".sdxl-bento" / "state")
    """Folder of the task journal (survives restarts, unlike BentoML's task database)."""

    # -- retention -----------------------------------------------------------------------------
    image_retention_s: float = Field(default=7 * 86_400, ge=60, le=10 * 365 * 86_400)
    """How long stored images are kept; older ones are deleted by the background sweep."""

    image_store_max_bytes: int = Field(default=50 * 2**30, ge=2**20)
    """Disk the image store may use; beyond it the oldest images go first."""

    task_retention_s: float = Field(default=7 * 86_400, ge=60, le=10 * 365 * 86_400)
    """How long ended tasks (their state, owner, reason and result) stay answerable."""

    retention_sweep_s: float = Field(default=300, ge=1, le=86_400)
    """Seconds between two retention sweeps of the image store and the task journal."""

    # -- gateway -------------------------------------------------------------------------------
    keys_file: Optional[Path] = None
    """API keys and tiers (YAML or TOML); without one the service runs open."""

    auth: Literal["optional", "required"] = "optional"
    """``required`` refuses to start without a keys file."""

    redis_url: Optional[SecretStr] = None
    """Redis for rate limits and the result cache, shared by workers and replicas; in-process without it."""

    replica_url: str = ""
    """This replica's URL as the other replicas reach it; with Redis, tasks are then reachable through any replica."""

    internal_secret: Optional[SecretStr] = None
    """Shared by every replica: signs requests forwarded between replicas (instead of the client's key) and
    image URLs. Required with keys and ``replica_url``; without it one is made and kept in the state dir."""

    image_url_ttl_s: int = Field(default=3600, ge=60, le=7 * 86_400)
    """With keys: how long the signed image URLs in answers stay valid (the owner's key works any time)."""

    cache: bool = True
    """Serve identical requests (same parameters and seed) from the result cache."""

    cache_unseeded: bool = False
    """Also cache requests without a seed (they would otherwise differ each time)."""

    cache_ttl_s: int = Field(default=24 * 3600, ge=1)
    """How long Redis keeps cached results."""

    cache_max_bytes: int = Field(default=512 * 2**20, ge=0)
    """Memory bound of the embedded cache."""

    audit_log: Optional[Path] = None
    """JSON-lines audit file (size-rotated); default ``<state_dir>/audit.jsonl``."""

    audit_stdout: bool = False
    """Also write audit lines to stdout."""

    audit_prompts: Literal["plain", "hash"] = "plain"
    """``hash`` records sha256 of prompts instead of their text."""

    audit_max_bytes: int = Field(default=50 * 2**20, ge=4096)
    """Size at which the audit file rotates (5 backups kept)."""

    # -- provenance (C2PA Content Credentials) --------------------------------------------------------------
    c2pa_cert: Optional[Path] = None
    """PEM file: the signing certificate first, then its chain (ES256 or Ed25519). With ``c2pa_key``, every image
    is signed with a C2PA manifest; without them, images carry none."""

    c2pa_key: Optional[Path] = None
    """PEM file: the unencrypted private key of the signing certificate (a secret: keep the file readable by the
    service's user only)."""

    c2pa_tsa_url: str = Field(default="", pattern=r"^(https?://\S+)?$", max_length=2000)
    """An RFC 3161 time-stamping authority: each manifest then carries a trusted time. Empty: no timestamp."""

    c2pa_include_prompt: bool = False
    """Also write the prompt and negative prompt into the manifest (by default only a sha256 of the image's
    parameters text is there)."""

    c2pa_trust_anchors: Optional[Path] = None
    """PEM root certificates that ``/verify`` and ``sdxl-bento verify`` trust besides the C2PA library's own."""

    styles_file: Optional[Path] = None
    """Prompt styles (AUTOMATIC1111's styles.csv, or YAML/JSON: name, prompt, negative_prompt), re-read when it
    changes; requests name them in ``styles``. None: no styles."""

    # -- the job lifecycle: webhooks, live progress, idempotency, replay (issue 17) ----------------
    webhook_allow: str = ""
    """Webhook targets allowed although not public (comma-separated CIDRs such as ``127.0.0.0/8,::1/128``, or
    ``loopback``, ``private``, ``link-local``); empty: only public addresses. Names are resolved first and every
    address they resolve to must pass; the delivery connects to the address that was checked."""

    webhook_secret: Optional[SecretStr] = None
    """``whsec_...`` signing deliveries of requests made without a key (no keys file); unset: one is made once
    in the state folder (``webhook-secret``, mode 0600). With keys, each key signs with its own secret."""

    webhook_timeout_s: float = Field(default=10.0, gt=0, le=120)
    """Seconds one delivery attempt may take (connect and answer); longer counts as a failed attempt."""

    webhook_retry_base_s: float = Field(default=5.0, gt=0, le=3600)
    """First retry after about this long; each later one waits twice as long (with jitter), up to an hour."""

    webhook_max_age_s: float = Field(default=24 * 3600, ge=1, le=7 * 86_400)
    """A delivery is retried until this long after its event; then it is given up (``failed``)."""

    webhook_progress_interval_s: float = Field(default=5.0, ge=0.5, le=3600)
    """``job.progress`` deliveries (when asked for) come at most this often per job."""

    events_heartbeat_s: float = Field(default=15.0, ge=0.05, le=300)
    """Server-Sent Events: a comment line this often keeps proxies from closing an idle stream."""

    preview_every: int = Field(default=5, ge=0, le=100)
    """A preview image in the event stream every this many denoising steps (0: none)."""

    preview_size: int = Field(default=128, ge=32, le=512)
    """Longest side of preview images, in pixels."""

    preview_model: str = "sdxl-taesd:latest"
    """Model store tag of TAESD-XL (``sdxl-bento models import madebyollin/taesdxl --role preview``): previews
    decoded by it when present, else by SDXL's linear latent-to-RGB approximation."""

    idempotency_ttl_s: float = Field(default=24 * 3600, ge=60, le=7 * 86_400)
    """How long an ``Idempotency-Key`` and its answer are kept."""

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.auth == "required" and self.keys_file is None:
            raise ValueError("SDXL_BENTO_AUTH=required but no SDXL_BENTO_KEYS_FILE is set (create one with: "
                             "sdxl-bento keys add NAME --tier standard --file keys.yaml)")
        if self.keys_file is not None and self.replica_url and self.internal_secret is None:
            raise ValueError("with keys and SDXL_BENTO_REPLICA_URL, the replicas need a shared "
                             "SDXL_BENTO_INTERNAL_SECRET (it signs requests forwarded between them and image links)")
        if (self.c2pa_cert is None) != (self.c2pa_key is None):
            raise ValueError("C2PA signing needs both SDXL_BENTO_C2PA_CERT and SDXL_BENTO_C2PA_KEY (or neither)")
        return self

    def warmup(self, device: str) -> tuple[int, int]:
        size = ("1024x1024" if device == "cuda" else "256x256") if self.warmup_size == "auto" else self.warmup_size
        width, height = (int(v) // 8 * 8 for v in size.split("x"))
        return width, height

    def audit_path(self) -> Path:
        return self.audit_log or self.state_dir / "audit.jsonl"

    def redis(self) -> str | None:
        return self.redis_url.get_secret_value() if self.redis_url else None

    def traffic(self) -> dict[str, float | int]:
        """BentoML traffic settings.

        BentoML answers 429 itself past ``max_concurrency``; ours answers 503 with Retry-After
        first, so BentoML's bound is set above it, leaving room for status polls and downloads.
        BentoML's timeout likewise sits above ours, so ours always answers first.
        """
        return {
            "concurrency": self.concurrency,
            "max_concurrency": self.max_concurrency + 64,
            "timeout": self.timeout + 60,
        }


def tags(value: str) -> list[str]:
    """A comma-separated list of model store tags."""
    return [tag.strip() for tag in value.split(",") if tag.strip()]
