"""The building blocks every layer above uses: agents (one OpenAI-compatible endpoint each, with
retries and classification), their limits (token buckets, concurrency windows), routing between
them, structured output (JSON Schema checks), and how an embedded llama.cpp server is sized."""
