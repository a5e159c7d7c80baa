"""The KV tier with --slkv-offload: device rows, admission ledger, planner (scheduler side) and executor (worker side)."""
