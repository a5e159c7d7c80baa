"""The multi-turn chat API (FastAPI) in front of SGLang with the SimLayerKV plugin."""
