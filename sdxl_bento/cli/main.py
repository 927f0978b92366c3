"""The ``sdxl-bento`` command: put models into the Bento model store and list them; generate; verify."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .. import buildinfo
from ..store import modelstore as store
from . import generate as cli_generate
from . import verify as cli_verify


def _import(args: argparse.Namespace) -> int:
    source = args.source or store.DEFAULT_SOURCES[args.role]
    if args.role == "safety":
        tag = store.import_checker(source, args.kind, tag=args.tag, synthetic=args.synthetic)
    elif args.role == "preview":
        tag = store.import_preview(source, tag=args.tag)
    else:
        tag = store.import_pipeline(source, args.role, tag=args.tag, dtype=args.dtype, config=args.config)
    print(f"imported {source} as {tag} ({args.role})")
    return 0


def _synth(args: argparse.Namespace) -> int:
    for tag in store.save_synthetic(args.preset, refiner=args.refiner, base_tag=args.tag,
                                    refiner_tag=args.refiner_tag, seed=args.seed):
        print(f"saved synthetic {args.preset} model {tag} (random weights: for testing and timing only)")
    if args.preview:
        print(f"saved synthetic preview decoder {store.save_synthetic_preview(seed=args.seed)} (a tiny TAESD)")
    return 0


def _import_lora(args: argparse.Namespace) -> int:
    from ..store.loras import import_lora

    print(f"imported LoRA {args.source} as {import_lora(args.source, args.tag)}")
    return 0


def _list(args: argparse.Namespace) -> int:
    rows = store.list_models()
    if args.json:
        print(json.dumps([{"tag": r.tag, "path": str(r.path), **r.metadata} for r in rows], indent=2))
        return 0
    if not rows:
        print("no SDXL models in the Bento model store; import one with:\n  " + store.fix_command("base", "sdxl-base"))
        return 0
    print(f"{'TAG':<40} {'ROLE':<8} {'DTYPE':<9} {'SYNTHETIC':<9} SOURCE")
    for r in rows:
        m = r.metadata
        print(f"{r.tag:<40} {m.get('role', ''):<8} {m.get('dtype', ''):<9} {str(bool(m.get('synthetic'))).lower():<9} "
              f"{m.get('source', '')}")
    return 0


def _keys_add(args: argparse.Namespace) -> int:
    from ..http.auth import add_key, new_webhook_secret

    secret = new_webhook_secret()
    key = add_key(args.file, args.name, args.tier, webhook_secret=secret)
    print(f"added key {args.name!r} (tier {args.tier}) to {args.file}; both are shown once.")
    print(f"webhook signing secret (Standard Webhooks; your receiver verifies deliveries with it): {secret}")
    print("API key (only its sha256 is stored):")
    print(key)
    return 0


def _keys_webhook_secret(args: argparse.Namespace) -> int:
    from ..http.auth import set_webhook_secret

    secret = set_webhook_secret(args.file, args.name)
    print(f"new webhook signing secret of key {args.name!r} in {args.file} (shown once; the old one no longer signs):")
    print(secret)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="sdxl-bento", description="SDXL on BentoML: model store tools.",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)  # --version on one line
    top.add_argument("--version", action="version", version=buildinfo.describe())
    groups = top.add_subparsers(dest="group", required=True)
    models = groups.add_parser("models", help="manage SDXL pipelines in the Bento model store")
    cmds = models.add_subparsers(dest="command", required=True)

    imp = cmds.add_parser("import", help="import SDXL weights (hub id, diffusers folder or .safetensors file)")
    imp.add_argument("source", nargs="?", help="hub repo id, local diffusers folder or single .safetensors file "
                                                "(default: the official SDXL 1.0 repo for the role)")
    imp.add_argument("--role", choices=store.ROLES, default="base")
    imp.add_argument("--tag", help="model name in the store (default: sdxl-base / sdxl-refiner)")
    imp.add_argument("--dtype", choices=store.DTYPES, default="float16", help="dtype to store the weights in")
    imp.add_argument("--config", help="for a single file offline: a local diffusers folder with the matching "
                                      "configs and tokenizers")
    imp.add_argument("--kind", choices=store.CHECKER_KINDS, default="sd-safety-checker",
                     help="for --role safety: how the checker is loaded")
    imp.add_argument("--synthetic", action="store_true", help=argparse.SUPPRESS)
    imp.set_defaults(run=_import)

    syn = cmds.add_parser("synth", help="save SDXL-architecture pipelines with random weights (no download)")
    syn.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    syn.add_argument("--refiner", action="store_true", help="also save a refiner")
    syn.add_argument("--tag", help="base model name (default: sdxl-base)")
    syn.add_argument("--refiner-tag", help="refiner model name (default: sdxl-refiner)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--preview", action="store_true", help="also save a tiny TAESD preview decoder (sdxl-taesd)")
    syn.set_defaults(run=_synth)

    lora = cmds.add_parser("import-lora", help="import a LoRA (.safetensors file, folder or hub id) into the store")
    lora.add_argument("source", help="a .safetensors file, a folder with pytorch_lora_weights.safetensors, "
                                     "or a Hugging Face repo id holding one")
    lora.add_argument("--tag", required=True, help="the name requests use in loras: [{name, weight}]")
    lora.set_defaults(run=_import_lora)

    lst = cmds.add_parser("list", help="list the SDXL pipelines in the store")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(run=_list)

    keys = groups.add_parser("keys", help="manage API keys")
    keys_cmds = keys.add_subparsers(dest="command", required=True)
    add = keys_cmds.add_parser("add", help="create a key: prints it once, stores only its sha256")
    add.add_argument("name")
    add.add_argument("--tier", default="standard", help="free, standard, premium or a tier defined in the file")
    add.add_argument("--file", type=Path, default=Path(os.environ.get("SDXL_BENTO_KEYS_FILE", "keys.yaml")),
                     help="keys file, YAML or TOML (default: $SDXL_BENTO_KEYS_FILE or ./keys.yaml)")
    add.set_defaults(run=_keys_add)
    rotate = keys_cmds.add_parser("webhook-secret", help="give a key a new webhook signing secret (shown once)")
    rotate.add_argument("name")
    rotate.add_argument("--file", type=Path, default=Path(os.environ.get("SDXL_BENTO_KEYS_FILE", "keys.yaml")),
                        help="keys file (YAML)")
    rotate.set_defaults(run=_keys_webhook_secret)
    cli_generate.register(groups)
    cli_verify.register(groups)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, ConnectionError, FileNotFoundError) as exc:
        print(f"sdxl-bento: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
