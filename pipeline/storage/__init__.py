"""Storage: WebDataset shards, variants and their manifests, output folders, cards, verification, publishing
and loading shared copies."""
