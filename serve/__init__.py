"""Serving: paged KV cache, continuous batching, the HTTP API. (Not built yet: see the issues.)"""
