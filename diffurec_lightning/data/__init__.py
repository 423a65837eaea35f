"""Data: benchmark downloads, raw importers, the sequence cache and the Lightning DataModule."""
