"""SimLayerKV attention backends: SGLang's own backends plus per-request lazy-layer scoring and decode."""
