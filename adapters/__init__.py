"""Adapters: one module per array library, each connecting the array-API core to it."""
