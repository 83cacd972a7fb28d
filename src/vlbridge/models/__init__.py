"""One folder per design: its config, model, processor and checkpoint converters."""
