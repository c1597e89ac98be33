"""Development helpers shared by tests, benchmarks and the demo (not loaded by ComfyUI)."""
