"""KV-cache quality, measured the way the field measures it: perplexity of a text scored
through the sharded model and its cache, and divergence from full-precision KV."""
