"""Token-level scheduler: request state, paged-KV bookkeeping, batching policy. No torch."""
