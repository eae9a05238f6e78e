//! End-to-end tests of the `lora_tools` commands.
