"""reflora.backends.torch: eager torch ops, the torch-side QuantState, and drop-in LoRA/QLoRA modules."""
