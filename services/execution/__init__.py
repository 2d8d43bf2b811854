"""The execution service: durable multi-step tasks and sandboxed Python."""
