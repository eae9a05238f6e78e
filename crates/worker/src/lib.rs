//! The GPU worker: Stable Diffusion models on burn, LoRA injection, training and sampling.
