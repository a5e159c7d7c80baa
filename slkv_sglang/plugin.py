"""The SGLang plugin (entry point group ``sglang.srt.plugins``): where a reader starts.

``register()`` runs in every SGLang process (launcher/tokenizer, scheduler, detokenizer). It only installs the
hooks listed in ``hook_table``; nothing happens unless SimLayerKV is enabled (``--enable-simlayerkv`` or
``SLKV_ENABLE=1``). The hooks, by concern (``slkv_sglang/hooks/``):

- ``flags``: the ``--slkv-*`` flags and the start-up checks (launcher process);
- ``requests``: tokenizer side, a request's settings checked against the served model;
- ``scheduler``: the scheduler process's state (``SchedulerSide``), the attention backends, the hand-off to the
  backend before each forward and back after it, which decode batches replay a CUDA graph;
- ``admission``: the radix cache, the slot allocator and admission, counting rows with ``--slkv-offload``;
- ``reporting``: layer maps to clients, sizes in SGLang's internal state, the admin channel's settings.

Data flow: ``stage_forward`` (ForwardBatch.init_new) stages each request's settings for the attention backend
(a subclass of SGLang's torch_native or FlashInfer backend), which scores layers and restricts decode; a
decision's record waits in the outbox until the batch result moves it into ``req.customized_info``, which SGLang
ships to the tokenizer process, where it becomes ``meta_info["slkv"]``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from .hooks import admission, flags, reporting, requests
from .hooks.scheduler import (SchedulerSide, admit_graph, install_backends, release_request, settle_before_stash,
                              settle_failures, stage_forward)

_SRT = "sglang.srt."
_ALLOCATOR = "mem_cache.allocator."
_SCHEDULER = "managers.scheduler_components."


def hook_table(side: SchedulerSide) -> list[tuple[str, Callable[..., Any], HookType]]:
    """Every SGLang function the plugin hooks (under ``sglang.srt.``), with the hook and its kind; the hooks that
    read the scheduler's state get ``side`` bound."""
    def bound(fn: Callable[..., Any]) -> Callable[..., Any]:
        return partial(fn, side)

    return [
        # flags and start-up
        ("server_args.ServerArgs.add_cli_args", flags.add_cli_args, HookType.AFTER),
        ("entrypoints.engine.Engine._launch_subprocesses", flags.validate_startup, HookType.BEFORE),
        ("server_args.ServerArgs.resolve_once", flags.plan_server_args, HookType.BEFORE),
        ("server_args.ServerArgs.resolve_once", flags.check_resolved, HookType.AFTER),
        # tokenizer side
        ("managers.tokenizer_manager.TokenizerManager.generate_request", requests.validate_request, HookType.BEFORE),
        ("managers.tokenizer_manager.TokenizerManager.create_abort_task", requests.validate_before_streaming,
         HookType.BEFORE),
        # scheduler side: each forward, and a request leaving
        ("model_executor.forward_batch_info.ForwardBatch.init_new", bound(stage_forward), HookType.AFTER),
        ("model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.can_run_graph", admit_graph,
         HookType.AFTER),
        ("managers.scheduler.Scheduler.process_batch_result", bound(settle_failures), HookType.BEFORE),
        # overlap scheduling caches a chunk (stash) before the previous forward's result is processed
        ("managers.scheduler.Scheduler.stash_chunked_request", bound(settle_before_stash), HookType.BEFORE),
        ("mem_cache.common.release_kv_cache", bound(release_request), HookType.BEFORE),
        # the radix cache, the allocator and admission
        ("managers.schedule_batch.Req._compute_max_prefix_len", bound(admission.cap_prefix), HookType.AFTER),
        ("managers.schedule_batch.Req.init_next_round_input", bound(admission.restore_shared), HookType.BEFORE),
        ("managers.schedule_batch.Req.init_next_round_input", bound(admission.match_prefix), HookType.AFTER),
        ("mem_cache.unified_radix_cache.UnifiedRadixCache.insert", bound(admission.adopt_duplicates), HookType.AROUND),
        (_ALLOCATOR + "token.TokenToKVPoolAllocator.free", bound(admission.free_slots), HookType.BEFORE),
        (_ALLOCATOR + "token.TokenToKVPoolAllocator.clear", bound(admission.reset_rows), HookType.AFTER),
        (_ALLOCATOR + "token.TokenToKVPoolAllocator.alloc", bound(admission.alloc_with_rows), HookType.AROUND),
        (_ALLOCATOR + "base.BaseTokenToKVPoolAllocator.evict_to_free_tokens", bound(admission.evict_more),
         HookType.AFTER),
        (_ALLOCATOR + "base.BaseTokenToKVPoolAllocator.check_decode_capacity", bound(admission.decode_fits_rows),
         HookType.AFTER),
        ("mem_cache.prefill_budget.PrefillBudget._available_and_evictable", bound(admission.evictable_by_rows),
         HookType.AFTER),
        ("mem_cache.allocation.alloc_for_extend", bound(admission.promise_prefix_rows), HookType.AROUND),
        ("managers.schedule_policy.PrefillAdder.add_one_req", bound(admission.charge_prefix_rows), HookType.AROUND),
        ("mem_cache.kv_cache_configurator.KVCacheConfigurator.config_from_budget", bound(admission.overcommit_pool),
         HookType.AFTER),
        ("mem_cache.kv_cache_configurator.KVCacheConfigurator._resolve_kv_pool_class", bound(admission.kv_pool_class),
         HookType.AROUND),
        ("models.utils.enable_fused_set_kv_buffer", bound(admission.unfuse_row_writes), HookType.AFTER),
        # reporting
        (_SCHEDULER + "batch_result_processor.SchedulerBatchResultProcessor._maybe_collect_customized_info",
         bound(reporting.report_decision), HookType.AFTER),
        (_SCHEDULER + "output_streamer.SchedulerOutputStreamer.is_request_level_customized_info_key",
         reporting.request_level_key, HookType.AFTER),
        ("managers.tokenizer_manager.TokenizerManager.update_request_meta_info", reporting.unwrap_meta, HookType.AFTER),
        (_SCHEDULER + "internal_state.SchedulerInternalStateController.get_internal_state",
         bound(reporting.report_sizes), HookType.AFTER),
        (_SCHEDULER + "internal_state.SchedulerInternalStateController._update_handlers",
         bound(reporting.admin_handlers), HookType.AFTER),
    ]


def register() -> None:
    side = SchedulerSide()
    for target, fn, kind in hook_table(side):
        HookRegistry.register(_SRT + target, fn, kind)
    install_backends(side)
