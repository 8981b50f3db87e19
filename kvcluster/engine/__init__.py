"""The in-process engine: continuous batching (scheduler, sequences, model runner) and token selection
(sampling parameters and their bounds, logits processors, structured output). Torch-free on import of
the package itself; `sampling_params` stays torch-free for the gateway."""
