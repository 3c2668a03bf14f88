"""Generation and serving for loopgolf models: a KV cache per virtual layer, early exit after each
pass of a recursive plan, continuous depth-wise batching, and an OpenAI-style HTTP server."""
