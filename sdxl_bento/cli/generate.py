"""``sdxl-bento generate``: one prompt to image files, through a running service's task API.

Submit (``POST /jobs/submit``), follow the task's Server-Sent Events ``GET /jobs/events`` (queue position,
then a progress bar over the denoising steps; a dropped stream resumes with ``Last-Event-ID``; a server without
events is polled at ``GET /jobs/status``), fetch ``GET /jobs/get`` and download each image from its ``url``. Ctrl-C
cancels the task on the server (``PUT /jobs/cancel``) before exiting. ``--json`` prints one JSON
object (task id, seeds, files) and no progress. Server errors are printed as plain sentences and
exit with 1.

Mounting: ``register(groups)`` in ``sdxl_bento.cli.parser()`` adds the subcommand; standalone:
``python -m sdxl_bento.cli_generate PROMPT ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx

FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
SCHEDULERS = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc")
POLL_S = 0.25


class Failure(Exception):
    """Something to tell the user in one sentence (exit 1)."""


def error_sentence(response: httpx.Response) -> str:
    """A plain sentence from an error answer: the service's ``{"error": {"message"}}``, BentoML's
    ``{"error": "...", "detail": [{"loc", "msg"}]}`` (sometimes inside a list), or the raw text."""
    try:
        body: Any = response.json()
    except ValueError:
        text = response.text.strip()[:300]
        return f"the server answered {response.status_code} {response.reason_phrase}" + (f": {text}" if text else "")
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]
    message = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message") or error.get("type")
        detail = body.get("detail")
        if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
            message = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []) if p != 'body')}: {d.get('msg')}"
                                .lstrip(": ") for d in detail)
        elif isinstance(error, str):
            message = error
        message = message or body.get("message") or body.get("reason")
    message = str(message or response.text.strip()[:300] or response.reason_phrase).rstrip(".")
    retry = response.headers.get("retry-after")
    return f"the server refused the request ({response.status_code}): {message}" + (
        f"; try again in {retry} s" if retry else "")


def output_paths(output: Path, count: int) -> list[Path]:
    """``out.png`` for one image; ``out-1.png``, ``out-2.png``... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(1, count + 1)]


def parse_size(size: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", size)
    if not match:
        raise Failure(f"--size must be WIDTHxHEIGHT, for example 1024x1024, not {size!r}")
    return int(match.group(1)), int(match.group(2))


def _checked(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise Failure(error_sentence(response))
    return response.json()


TERMINAL = {"completed": "completed", "failed": "failed", "cancelled": "canceled"}
"""A terminal event of the task's stream -> the task's status."""
RECONNECTS = 20


def _follow(client: httpx.Client, task_id: str, update: Any) -> str | None:
    """Follow the task's Server-Sent Events (``GET /jobs/events``) until its terminal event; its final status.
    A dropped stream is resumed with ``Last-Event-ID`` (nothing is missed). None when the server has no event
    stream (an older one): the caller polls instead."""
    from httpx_sse import SSEError, connect_sse

    last, failures = None, 0
    while failures <= RECONNECTS:
        headers = {"Last-Event-ID": last} if last else {}
        try:
            with connect_sse(client, "GET", "/jobs/events", params={"task_id": task_id}, headers=headers,
                             timeout=httpx.Timeout(60, read=120)) as source:
                if source.response.status_code in (404, 405) and last is None:
                    source.response.read()
                    if "text/event-stream" not in source.response.headers.get("content-type", ""):
                        return None
                if source.response.status_code >= 400:
                    source.response.read()
                    raise Failure(error_sentence(source.response))
                for event in source.iter_sse():
                    if event.id:
                        last = event.id
                    if event.event in TERMINAL:
                        return TERMINAL[event.event]
                    data = json.loads(event.data) if event.data else {}
                    if event.event in ("queued", "running"):
                        update(data)
        except (httpx.TransportError, SSEError):
            pass
        failures += 1
        time.sleep(min(2.0, 0.1 * failures))
    raise Failure(f"lost the event stream of task {task_id}")


def _wait(client: httpx.Client, task_id: str, show: bool) -> str:
    """Follow the task until it ends (its event stream, else polling its status); its final status."""
    progress = None
    if show:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

        progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[eta]}"), console=Console(stderr=True), transient=True)
        progress.start()
        bar = progress.add_task("submitted", total=None, eta="")
    def update(status: dict[str, Any]) -> None:
        if progress is None:
            return
        eta = f"eta {status['eta_s']:.0f} s" if isinstance(status.get("eta_s"), (int, float)) else ""
        if status.get("state") == "running" and status.get("total_steps"):
            progress.update(bar, description="denoising", total=status["total_steps"],
                            completed=status.get("step") or 0, eta=eta)
        elif status.get("queue_position") is not None:
            progress.update(bar, description=f"queued (position {status['queue_position'] + 1})", eta=eta)

    try:
        followed = _follow(client, task_id, update)
        if followed is not None:
            return followed
        while True:
            status = _checked(client.get("/jobs/status", params={"task_id": task_id}))
            if status.get("status") != "in_progress":
                return str(status.get("status"))
            update(status)
            time.sleep(POLL_S)
    finally:
        if progress is not None:
            progress.stop()


def _download(client: httpx.Client, images: list[dict[str, Any]], output: Path) -> list[Path]:
    """Each image from its ``url`` (absolute, or relative to the server) into its file; ``images`` are
    those the safety check did not withhold."""
    paths = output_paths(output, len(images))
    for image, path in zip(images, paths):
        download = client.get(image["url"])
        if download.status_code >= 400:
            raise Failure(f"could not download {image['url']}: {error_sentence(download)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(download.content)
    return paths


def generate(prompt: str, *, output: Path, server: str, api_key: str | None = None, seed: int | None = None,
             steps: int | None = None, size: str = "1024x1024", n: int = 1, refine: str = "none",
             negative: str | None = None, scheduler: str | None = None, json_output: bool = False,
             transport: httpx.BaseTransport | None = None) -> int:
    """Generate ``n`` images into ``output`` (``out-1.png``... for several); the exit code.
    ``transport`` replaces the network (tests)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        width, height = parse_size(size)
        body: dict[str, Any] = {"prompt": prompt, "width": width, "height": height, "num_images": n,
                                "refine": refine, "output_format": FORMATS.get(output.suffix.lower(), "png")}
        for name, value in (("seed", seed), ("steps", steps), ("negative_prompt", negative), ("scheduler", scheduler)):
            if value is not None:
                body[name] = value
        with httpx.Client(base_url=server, headers=headers, timeout=60, transport=transport) as client:
            task_id = str(_checked(client.post("/jobs/submit", json=body))["task_id"])
            try:
                status = _wait(client, task_id, show=not json_output)
            except KeyboardInterrupt:
                answer = client.put("/jobs/cancel", params={"task_id": task_id})
                done = "cancelled" if answer.status_code < 400 else f"could not cancel ({error_sentence(answer)})"
                print(f"sdxl-bento: interrupted: task {task_id} {done}", file=sys.stderr)
                return 130
            if status == "canceled":
                raise Failure(f"task {task_id} was cancelled")
            result = _checked(client.get("/jobs/get", params={"task_id": task_id}))  # a failed task: its error
            if status != "completed":
                raise Failure(f"task {task_id} ended {status}")
            kept = [image for image in result["images"] if image.get("url")]
            withheld = [image["seed"] for image in result["images"] if not image.get("url")]
            if not kept:
                raise Failure(f"task {task_id}: every image was withheld by the safety check (content_filtered)")
            paths = _download(client, kept, output)
    except Failure as exc:
        print(f"sdxl-bento: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the task existed, or while downloading: nothing left to cancel
        print("sdxl-bento: interrupted", file=sys.stderr)
        return 130
    except httpx.HTTPError as exc:
        print(f"sdxl-bento: cannot reach the service at {server} ({exc.__class__.__name__}: {exc})", file=sys.stderr)
        return 1
    seeds = [image["seed"] for image in kept]
    if json_output:
        print(json.dumps({"task_id": task_id, "seeds": seeds, "files": [str(p) for p in paths],
                          "withheld_seeds": withheld, "model": result.get("model"),
                          "synthetic": result.get("synthetic", False)}))
    else:
        for path, image_seed in zip(paths, seeds):
            print(f"wrote {path} (seed {image_seed})")
        if withheld:
            print(f"note: the safety check withheld {len(withheld)} image(s) (seeds {', '.join(map(str, withheld))})",
                  file=sys.stderr)
        if result.get("synthetic"):
            print("note: the service runs a synthetic model (random weights): the images are noise", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    return generate(args.prompt, output=args.output, server=args.server, api_key=args.api_key, seed=args.seed,
                    steps=args.steps, size=args.size, n=args.n, refine=args.refine, negative=args.negative,
                    scheduler=args.scheduler, json_output=args.json)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``generate`` to the ``sdxl-bento`` command's subparsers."""
    gen = subparsers.add_parser("generate", help="generate images with a running service (its task API)",
                                description="Generate images with a running sdxl-bento service.")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", type=Path, default=Path("out.png"),
                     help="file to write (.png, .jpg or .webp); several images: out-1.png, out-2.png... "
                          "(default: out.png)")
    gen.add_argument("--server", default=os.environ.get("SDXL_BENTO_URL", "http://localhost:3000"),
                     help="service URL (default: $SDXL_BENTO_URL or http://localhost:3000)")
    gen.add_argument("--api-key", default=os.environ.get("SDXL_BENTO_API_KEY"),
                     help="API key, sent as Authorization: Bearer (default: $SDXL_BENTO_API_KEY)")
    gen.add_argument("--seed", type=int, help="seed of the first image (default: random; always printed)")
    gen.add_argument("--steps", type=int, help="denoising steps (default: the service's, 30)")
    gen.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT (default: 1024x1024)")
    gen.add_argument("-n", type=int, default=1, help="number of images (default: 1)")
    gen.add_argument("--refine", choices=("none", "ensemble", "img2img"), default="none", help="refiner mode")
    gen.add_argument("--negative", help="negative prompt")
    gen.add_argument("--scheduler", choices=SCHEDULERS, help="sampler (default: the service's, euler)")
    gen.add_argument("--json", action="store_true", help="print one JSON object (task id, seeds, files)")
    gen.set_defaults(run=_run)
    return gen


def main(argv: list[str] | None = None) -> int:
    top = argparse.ArgumentParser(prog="sdxl-bento")
    register(top.add_subparsers(dest="group", required=True))
    args = top.parse_args(["generate", *(sys.argv[1:] if argv is None else argv)])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
