"""``slkv``: one command, a few subcommands; each subcommand module parses its own options."""

from __future__ import annotations

import importlib
import logging
import sys

# subcommand -> (module with ``main(argv) -> int``, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "setup": ("slkv_sglang.setup_cmd", "prepare this machine: bundled model, sgl_kernel stand-in if needed"),
    "serve": ("api.server", "start the engine with the plugin and the chat API (bundled model by default)"),
    "eval": ("slkv_sglang.tools.evaluate", "long-context retrieval (needle) evaluation through the real engine"),
    "calibrate": ("slkv_sglang.tools.calibrate", "measure a model's best SimLayerKV settings on calibration needles; write a profile"),
    "bench": ("slkv_sglang.tools.bench", "identification overhead and decode step time, SimLayerKV vs full KV"),
    "bench-offload": ("slkv_sglang.tools.bench_offload", "host-tier offload/reload bandwidth vs a plain tensor copy"),
    "bench-memory": ("slkv_sglang.tools.bench_memory", "device KV per session and next-turn latency with --slkv-offload"),
    "bench-shared": ("slkv_sglang.tools.bench_shared", "next-turn TTFT after a worker switch: shared-tier restore vs recompute"),
    "bench-serve": ("slkv_sglang.tools.bench_serve", "multi-turn chat under a fixed device KV budget: plain SGLang vs SimLayerKV (+ offload)"),
    "gpu-check": ("slkv_sglang.tools.gpu_check", "the CUDA path's FlashInfer calls, decode time, host tier (torch + FlashInfer)"),
    "gpu-e2e": ("slkv_sglang.tools.gpu_e2e", "the plugin in the real SGLang engine on a GPU, end to end: correctness vs the reference, serving"),
}


def _usage() -> str:
    lines = ["usage: slkv <command> [options]", "", "commands:"]
    width = max(map(len, SUBCOMMANDS))
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines.append("\n`slkv <command> --help` documents each command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"slkv: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
