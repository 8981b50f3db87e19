"""Models: what a model's files say (config, tokenizer, chat template), loading their weights (GGUF,
Hugging Face, shipped packages) and the forward over a paged KV pool (llama, Gemma 3, attention and
its compiled CPU and Triton kernels)."""
