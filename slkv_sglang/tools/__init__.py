"""What is not the product: evaluation, calibration, benchmarks, the device check and the reference model.

Only ``slkv_sglang.cli`` (and the tests) import these modules; nothing in the plugin, the KV tier or the chat API
does, so a serving process never loads them.
"""
