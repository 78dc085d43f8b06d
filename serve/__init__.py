"""Serving: paged KV cache and allocator, chunked-prefill scheduler, the engine, Pallas kernels, the OpenAI-compatible server, and the benchmark client (serve/bench)."""
