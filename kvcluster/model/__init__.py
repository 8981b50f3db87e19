"""The model engine: GGUF loading, llama forward over a paged KV pool, tokenizer, sampling."""
