"""linkfix: patchable paravirtualized call sites, chosen after the final link."""

__version__ = "0.1.0"
