"""Tokenizer side: a request's ``custom_params.slkv`` are checked against the served model's layers before the
request reaches the scheduler, so that a bad field is a 400 naming it and never an error inside the engine."""

from __future__ import annotations

from typing import Any

from ..model_layers import ModelLayers
from ..request_params import RequestParamsError, check_generate


def validate_request(tokenizer_manager: Any, obj: Any, *args: Any, **kwargs: Any) -> None:
    """TokenizerManager.generate_request: SGLang answers the ValueError with a 400 naming the field;
    ``Engine.generate`` raises it."""
    check_generate(getattr(obj, "sampling_params", None), ModelLayers.from_model_config(tokenizer_manager.model_config))
    return None


def validate_before_streaming(tokenizer_manager: Any, obj: Any, *args: Any, **kwargs: Any) -> None:
    """TokenizerManager.create_abort_task: a streaming ``/generate`` sends its 200 before ``generate_request``
    runs (its errors become an event in the stream); this is called first, so bad settings get their 400."""
    try:
        validate_request(tokenizer_manager, obj)
    except RequestParamsError as exc:
        from fastapi import HTTPException

        raise HTTPException(status_code=400, detail=str(exc)) from exc
    return None
