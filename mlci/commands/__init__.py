"""One module per CLI command (asv-style); `mlci.cli` only parses and wires."""
