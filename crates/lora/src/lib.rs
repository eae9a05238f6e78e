//! kohya-format LoRA files: read, write, inspect; merge, SVD merge, resize.
