"""The decoder (Llama / Qwen2 / Qwen3), its HF config, weights in and out, and sharding rules."""
