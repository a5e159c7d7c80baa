"""The plugin's hooks into SGLang, one module per concern; ``slkv_sglang.plugin`` lists them all in one table."""
