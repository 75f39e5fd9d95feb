"""``python -m workers --role {agg,encode,prefill,decode} --model PATH [...]``

One Role -> one worker class. Defaults come from the frozen config dataclasses (WorkerConfig,
ClusterConfig.from_env(), MediaConfig.from_env()); the command line overrides them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import fields

from common.config import ClusterConfig, add_cluster_args
from common.media import MediaConfig
from common.protocol import Role
from workers.base import Worker, WorkerConfig

_OPTIONAL_INT = ("kv_cache_mb", "num_kv_blocks", "max_model_len")
_HELP = {
    "attention_backend": "'auto' = 'triton' on a CUDA device, 'reference' elsewhere",
    "load_format": "'dummy' = random weights at the checkpoint's shapes (no safetensors needed)",
    "cuda_graphs": "capture decode steps as CUDA graphs (CUDA with the triton backend only)",
    "compile_lm": "torch.compile the LM decoder layers (CUDA only)",
    "compile_vision": "torch.compile the vision blocks (CUDA only)",
    "stream_interval": "engine steps between two deltas of a stream; 0 = from the load (1 up to 32 "
                       "running requests, at most 4)",
    "overlap_decode": "queue each decode step before reading the previous one's tokens, so host "
                      "work overlaps the GPU's (CUDA only)",
    "vision_cuda_graphs": "run the vision tower through CUDA graphs, one per image-size signature (CUDA only)",
}


def worker_class(role: Role) -> type[Worker]:
    from workers.agg import AggWorker
    from workers.decode import DecodeWorker
    from workers.encode import EncodeWorker
    from workers.prefill import PrefillWorker

    return {Role.AGG: AggWorker, Role.ENCODE: EncodeWorker, Role.PREFILL: PrefillWorker,
            Role.DECODE: DecodeWorker}[Role(role)]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    """One flag per WorkerConfig field (except role/model, which are required)."""
    group = parser.add_argument_group("worker")
    group.add_argument("--role", required=True, choices=[r.value for r in Role])
    group.add_argument("--model", required=True, help="checkpoint directory (config.json, weights, tokenizer)")
    for f in fields(WorkerConfig):
        if f.name in ("role", "model"):
            continue
        if isinstance(f.default, bool):  # --x / --no-x (argparse's type=bool would take "False" as true)
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=f.default,
                               help=_HELP.get(f.name, ""))
            continue
        kind = int if f.name in _OPTIONAL_INT else type(f.default)
        group.add_argument(_flag(f.name), type=kind, default=f.default,
                           help=f"{_HELP.get(f.name, '')} (default: {f.default})".lstrip())
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile both the LM layers and the vision blocks (CUDA only); "
                            "sets --compile-lm and --compile-vision together")


def add_media_args(parser: argparse.ArgumentParser) -> None:
    d = MediaConfig.from_env()
    group = parser.add_argument_group("media")
    group.add_argument("--allowed-local-media-path", default=d.allowed_local_media_path,
                       help="directory local image / embedding files may come from (env "
                            "ALLOWED_LOCAL_MEDIA_PATH); none by default")
    group.add_argument("--max-file-size-mb", type=float, default=d.max_file_size_mb,
                       help="cap on downloads, data: URLs and files (env MAX_FILE_SIZE_MB)")
    group.add_argument("--allow-private-media-urls", action="store_true",
                       help="allow image URLs on loopback / private / link-local addresses")
    group.add_argument("--allow-loopback-media-urls", action="store_true",
                       help="allow image URLs on loopback addresses only (local demos, tests)")
    group.add_argument("--media-fetch-timeout-s", type=float, default=d.fetch_timeout_s)
    group.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_worker_args(parser)
    add_media_args(parser)
    add_cluster_args(parser)
    # The brief's spelling; same setting as --lease-ttl-s.
    parser.add_argument("--lease-ttl", dest="lease_ttl_s", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default=os.environ.get("TRIAD_LOG_LEVEL", "INFO"))
    return parser


def configs(args: argparse.Namespace) -> tuple[WorkerConfig, ClusterConfig, MediaConfig]:
    names = [f.name for f in fields(WorkerConfig)]
    values = {n: getattr(args, n) for n in names}
    if getattr(args, "compile", None) is not None:  # --compile / --no-compile: both parts at once
        values.update(compile_lm=args.compile, compile_vision=args.compile)
    worker = WorkerConfig(**values)
    media = MediaConfig(allowed_local_media_path=args.allowed_local_media_path,
                        max_file_size_mb=args.max_file_size_mb,
                        allow_private_media_urls=args.allow_private_media_urls,
                        allow_loopback_media_urls=args.allow_loopback_media_urls,
                        fetch_timeout_s=args.media_fetch_timeout_s,
                        max_image_pixels=args.max_image_pixels)
    return worker, ClusterConfig.from_args(args), media


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lease_ttl_s is None:
        args.lease_ttl_s = ClusterConfig.from_env().lease_ttl_s
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [{args.role}] %(name)s: %(message)s")
    try:
        worker_cfg, cluster, media = configs(args)
    except ValueError as exc:
        parser.error(str(exc))
    worker = worker_class(worker_cfg.role)(worker_cfg, cluster, media)
    return asyncio.run(worker.run())


if __name__ == "__main__":
    sys.exit(main())
