"""The image side of the pipeline: linked image -> validated tables -> patched image.

See docs/MAP.md for which module owns which concept."""
