"""The spec side of the pipeline: op spec -> checked, measured bodies -> generated sources.

See docs/MAP.md for which module owns which concept."""
